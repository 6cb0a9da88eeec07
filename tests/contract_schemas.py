"""Load the published contracts (schemas/*.schema.json, schemas/asyncapi.yaml) the way a consumer would.

Only standard machinery: `jsonschema` validators over a `referencing` registry of every schema file by its
`$id`, and plain YAML for the AsyncAPI document. Shared by the unit and the wire contract tests.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from typing import Any
from urllib.parse import urldefrag

import yaml
from jsonschema import Draft202012Validator
from referencing import Registry
from referencing.jsonschema import DRAFT202012

SCHEMA_DIR = Path(__file__).resolve().parents[1] / "schemas"
ASYNCAPI = SCHEMA_DIR / "asyncapi.yaml"


@cache
def schema_files() -> dict[str, dict[str, Any]]:
    """Every JSON Schema file, by file name."""
    return {path.name: json.loads(path.read_text()) for path in sorted(SCHEMA_DIR.glob("*.schema.json"))}


@cache
def registry() -> Registry[Any]:
    return Registry().with_resources(
        (doc["$id"], DRAFT202012.create_resource(doc)) for doc in schema_files().values()
    )


def validator(schema: dict[str, Any] | str) -> Draft202012Validator:
    """A validator for a schema file (by name) or an inline schema that may $ref the files."""
    doc = schema_files()[schema] if isinstance(schema, str) else schema
    return Draft202012Validator(doc, registry=registry())


def errors(schema: dict[str, Any] | str, instance: Any) -> list[str]:
    found = validator(schema).iter_errors(instance)
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message[:200]}" for e in found]


@cache
def asyncapi() -> dict[str, Any]:
    doc = yaml.safe_load(ASYNCAPI.read_text())
    assert isinstance(doc, dict)
    return doc


def refs(node: Any) -> Iterator[str]:
    """Every `$ref` value anywhere in a YAML/JSON tree."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "$ref" and isinstance(value, str):
                yield value
            else:
                yield from refs(value)
    elif isinstance(node, list):
        for item in node:
            yield from refs(item)


def pointer(doc: Any, fragment: str) -> Any:
    """Resolve a JSON pointer fragment ('/a/b', '' for the whole document); KeyError/IndexError if absent."""
    node = doc
    for raw in fragment.split("/")[1:] if fragment else []:
        part = raw.replace("~1", "/").replace("~0", "~")
        node = node[int(part)] if isinstance(node, list) else node[part]
    return node


def resolve_asyncapi(ref: str) -> Any:
    """Resolve a $ref of the AsyncAPI document: '#/...' inside it, 'file.schema.json#/...' to a schema file."""
    target, fragment = urldefrag(ref)
    doc = asyncapi() if target == "" else schema_files()[target]
    return pointer(doc, fragment)


def deref(node: Any) -> Any:
    """Follow AsyncAPI `$ref`s until a node that is not a bare reference."""
    while isinstance(node, dict) and set(node) == {"$ref"}:
        node = resolve_asyncapi(node["$ref"])
    return node


def channel_message(channel: str) -> dict[str, Any]:
    """The (single) message of a channel, dereferenced."""
    messages = deref(asyncapi()["channels"][channel])["messages"]
    assert len(messages) == 1, f"channel {channel} has {len(messages)} messages"
    message = deref(next(iter(messages.values())))
    assert isinstance(message, dict)
    return message


def message_schema(channel: str, part: str) -> dict[str, Any]:
    """The JSON Schema of a channel message's `payload` or `headers`, as a schema that $refs the files.

    A Multi Format Schema Object (`schemaFormat` + `schema`) must name JSON Schema 2020-12.
    """
    node = deref(channel_message(channel)[part])
    if "schemaFormat" in node:
        assert node["schemaFormat"] == "application/schema+json;version=draft-2020-12", node["schemaFormat"]
        node = node["schema"]
    if set(node) == {"$ref"}:
        target, fragment = urldefrag(node["$ref"])
        base = schema_files()[target]["$id"]
        return {"$ref": f"{base}#{fragment}" if fragment else base}
    return dict(node)

