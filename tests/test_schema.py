"""The descriptor JSON Schema (spec §3.5, Appendix A) against the code that writes and reads descriptors.

jsonschema is not a dependency, so the schema is checked with a small validator for exactly the keywords
it uses (a test fails if the schema starts using another one). The tests prove that:

* the schema file is valid JSON, covers the descriptor's fields and agrees with the code's enumerations;
* Appendix A of the spec reproduces the schema file;
* every descriptor ``fp4fmt.save_file`` writes (both schemes, all rules, both layouts, 1-D to 3-D, axis
  0, every source dtype family, zero-size) and every conformance vector satisfies the schema;
* broken descriptors are rejected by the schema *and* by ``descriptor.parse``, with an error naming the
  file, the tensor and the rule; the checks the schema cannot express (§3.5) are still made by parse;
* minor-version additions (unknown members, a newer minor) pass both.
"""

from __future__ import annotations

import json
import re
import struct
from collections.abc import Callable
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

import fp4fmt
from fp4fmt import FormatError, UnsupportedVersionError, dtypes, layout, schemes
from fp4fmt.descriptor import DESCRIPTOR_KEY, TensorDescriptor

REPO = Path(__file__).resolve().parent.parent
SCHEMA_PATH = Path(fp4fmt.__file__).resolve().parent / "schema" / "descriptor.schema.json"
SPEC_PATH = REPO / "spec" / "fp4fmt-v1.md"
VECTORS = REPO / "spec" / "vectors"

# ---------------------------------------------------------------------------------------------------------
# A small JSON Schema (draft 2020-12) validator for the keywords the descriptor schema uses
# ---------------------------------------------------------------------------------------------------------

ANNOTATIONS = {"$schema", "$id", "$defs", "title", "description"}
ASSERTIONS = {
    "type", "enum", "const", "pattern", "minimum", "maximum", "minItems", "minLength", "items",
    "required", "properties", "additionalProperties", "allOf", "if", "then", "$ref",
}

_TYPES: dict[str, Callable[[object], bool]] = {
    "object": lambda v: isinstance(v, dict),
    "array": lambda v: isinstance(v, list),
    "string": lambda v: isinstance(v, str),
    # As in draft 2020-12, a number with a zero fractional part (16.0) is an integer; fp4fmt is stricter.
    "integer": lambda v: (isinstance(v, int) and not isinstance(v, bool)) or (isinstance(v, float) and v.is_integer()),
    "number": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
    "boolean": lambda v: isinstance(v, bool),
    "null": lambda v: v is None,
}


def _is_number(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _json_equal(a: object, b: object) -> bool:
    """Equality of JSON values: booleans are not numbers (Python's True == 1 is not JSON's)."""
    if isinstance(a, bool) or isinstance(b, bool):
        return isinstance(a, bool) and isinstance(b, bool) and a == b
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_json_equal(x, y) for x, y in zip(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_json_equal(a[k], b[k]) for k in a)
    if _is_number(a) and _is_number(b):
        return a == b
    return type(a) is type(b) and a == b


def _resolve(ref: str, root: dict) -> dict:
    """A local reference ``#/a/b`` inside ``root``."""
    if not ref.startswith("#/"):
        raise ValueError(f"only local $ref is supported, got {ref!r}")
    node: object = root
    for part in ref[2:].split("/"):
        node = node[part]  # type: ignore[index]
    return node  # type: ignore[return-value]


def validate(instance: object, schema: dict, root: dict | None = None, path: str = "$") -> list[str]:
    """Errors of ``instance`` against ``schema`` (empty when valid), each prefixed with its JSON path.

    An unknown keyword raises ValueError rather than being ignored, so the validator never silently
    accepts what it does not understand.
    """
    root = schema if root is None else root
    unknown = set(schema) - ANNOTATIONS - ASSERTIONS
    if unknown:
        raise ValueError(f"unsupported keyword(s) {sorted(unknown)} at {path}")
    errors: list[str] = []
    if "$ref" in schema:
        errors += validate(instance, _resolve(schema["$ref"], root), root, path)
    if "type" in schema and not _TYPES[schema["type"]](instance):
        errors.append(f"{path}: expected {schema['type']}, got {type(instance).__name__}")
    if "enum" in schema and not any(_json_equal(instance, v) for v in schema["enum"]):
        errors.append(f"{path}: {instance!r} is not one of {schema['enum']}")
    if "const" in schema and not _json_equal(instance, schema["const"]):
        errors.append(f"{path}: {instance!r} is not {schema['const']!r}")
    if isinstance(instance, str):
        if "pattern" in schema and not re.search(schema["pattern"], instance):
            errors.append(f"{path}: {instance!r} does not match {schema['pattern']}")
        if "minLength" in schema and len(instance) < schema["minLength"]:
            errors.append(f"{path}: shorter than {schema['minLength']}")
    if _is_number(instance):
        if "minimum" in schema and instance < schema["minimum"]:
            errors.append(f"{path}: {instance} < {schema['minimum']}")
        if "maximum" in schema and instance > schema["maximum"]:
            errors.append(f"{path}: {instance} > {schema['maximum']}")
    if isinstance(instance, list):
        if "minItems" in schema and len(instance) < schema["minItems"]:
            errors.append(f"{path}: fewer than {schema['minItems']} items")
        if "items" in schema:
            for i, item in enumerate(instance):
                errors += validate(item, schema["items"], root, f"{path}[{i}]")
    if isinstance(instance, dict):
        errors += _validate_object(instance, schema, root, path)
    for sub in schema.get("allOf", []):
        errors += validate(instance, sub, root, path)
    if "if" in schema and not validate(instance, schema["if"], root, path) and "then" in schema:
        errors += validate(instance, schema["then"], root, path)
    return errors


def _validate_object(instance: dict, schema: dict, root: dict, path: str) -> list[str]:
    """The object keywords: required, properties, additionalProperties."""
    errors = [f"{path}: missing required member {k!r}" for k in schema.get("required", []) if k not in instance]
    props = schema.get("properties", {})
    extra = schema.get("additionalProperties", True)
    for key, value in instance.items():
        if key in props:
            errors += validate(value, props[key], root, f"{path}.{key}")
        elif extra is False:
            errors.append(f"{path}: member {key!r} is not allowed")
        elif isinstance(extra, dict):
            errors += validate(value, extra, root, f"{path}.{key}")
    return errors


def schema_keywords(schema: dict) -> set[str]:
    """Every keyword used anywhere in ``schema`` (walking only schema positions, not data)."""
    found = set(schema)
    for key in ("properties", "$defs"):
        for sub in schema.get(key, {}).values():
            found |= schema_keywords(sub)
    for key in ("items", "additionalProperties", "if", "then"):
        if isinstance(schema.get(key), dict):
            found |= schema_keywords(schema[key])
    for sub in schema.get("allOf", []):
        found |= schema_keywords(sub)
    return found


@pytest.fixture(scope="module")
def schema() -> dict:
    """The descriptor schema, parsed from the file the package ships."""
    with open(SCHEMA_PATH, encoding="utf-8") as f:
        return json.load(f)


# ---------------------------------------------------------------------------------------------------------
# Raw file surgery: change the descriptor text of a written file, keeping the header length consistent
# ---------------------------------------------------------------------------------------------------------


def read_descriptor(path: Path) -> dict:
    """The descriptor document of an fp4fmt file, read with json and struct only."""
    blob = path.read_bytes()
    (n,) = struct.unpack("<Q", blob[:8])
    header = json.loads(blob[8 : 8 + n])
    return json.loads(header["__metadata__"][DESCRIPTOR_KEY])


def rewrite_descriptor_text(src: Path, dst: Path, edit: Callable[[str], str]) -> Path:
    """Copy ``src`` to ``dst`` with its descriptor text replaced by ``edit(text)``.

    The header is re-serialized, re-padded to 8 bytes and its length rewritten; the data buffer (whose
    offsets are relative to its own start) is copied unchanged.
    """
    blob = src.read_bytes()
    (n,) = struct.unpack("<Q", blob[:8])
    header = json.loads(blob[8 : 8 + n])
    header["__metadata__"][DESCRIPTOR_KEY] = edit(header["__metadata__"][DESCRIPTOR_KEY])
    text = json.dumps(header, separators=(",", ":")).encode("ascii")
    text += b" " * (-len(text) % 8)
    dst.write_bytes(struct.pack("<Q", len(text)) + text + blob[8 + n :])
    return dst


def _doc(mutate: Callable[[dict], None]) -> Callable[[str], str]:
    """A descriptor-text edit that applies ``mutate`` to the parsed document."""

    def edit(text: str) -> str:
        doc = json.loads(text)
        mutate(doc)
        return json.dumps(doc, separators=(",", ":"))

    return edit


def rewrite_descriptor(src: Path, dst: Path, mutate: Callable[[dict], None]) -> Path:
    """Copy ``src`` to ``dst`` with ``mutate`` applied to its parsed descriptor document."""
    return rewrite_descriptor_text(src, dst, _doc(mutate))


# ---------------------------------------------------------------------------------------------------------
# (a) The schema file itself
# ---------------------------------------------------------------------------------------------------------


def _scheme_clause(schema: dict, scheme: str) -> dict:
    """The ``then`` properties of the allOf clause that applies to ``scheme``."""
    for clause in schema["$defs"]["tensor"]["allOf"]:
        cond = clause["if"]["properties"]
        if cond.get("scheme", {}).get("const") == scheme:
            return clause["then"]["properties"]
    raise AssertionError(f"no allOf clause for scheme {scheme!r}")


def test_schema_file_is_draft_2020_12_with_the_descriptor_members(schema: dict) -> None:
    """The schema parses as JSON, declares draft 2020-12 and requires what descriptor.parse requires."""
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    assert schema["type"] == "object"
    assert sorted(schema["required"]) == ["checksums", "format_version"]
    assert set(schema["properties"]) == {"format_version", "tensors", "checksums"}
    assert schema["additionalProperties"] is True  # minor versions may add members (§1.2)
    tensor = schema["$defs"]["tensor"]
    assert tensor["additionalProperties"] is True
    written = TensorDescriptor("w", "nvfp4", (2, 16), "F32", 1, "linear", "amax").to_json()
    assert sorted(tensor["required"]) == sorted(written)
    assert set(tensor["properties"]) == set(written)


def test_schema_uses_only_keywords_the_validator_implements(schema: dict) -> None:
    """The test validator raises on unknown keywords; this pins the schema to the implemented subset."""
    used = schema_keywords(schema)
    assert used <= ANNOTATIONS | ASSERTIONS, sorted(used - ANNOTATIONS - ASSERTIONS)
    with pytest.raises(ValueError, match="unsupported keyword"):
        validate({}, {"propertyNames": {"pattern": "^a"}})


def test_schema_enumerations_match_the_code(schema: dict) -> None:
    """Schemes, layouts, source dtypes, block sizes and scale rules are the ones the code accepts."""
    props = schema["$defs"]["tensor"]["properties"]
    assert sorted(props["scheme"]["enum"]) == sorted(schemes.SCHEMES)
    assert tuple(props["scale_layout"]["enum"]) == layout.SCALE_LAYOUTS
    assert tuple(props["dtype"]["enum"]) == dtypes.FLOAT_SOURCE_DTYPES
    assert sorted(props["block_size"]["enum"]) == sorted(s.block_size for s in schemes.SCHEMES.values())
    all_rules = {r for s in schemes.SCHEMES.values() for r in s.scale_rules}
    assert set(props["scale_rule"]["enum"]) == all_rules
    for name, sch in schemes.SCHEMES.items():
        clause = _scheme_clause(schema, name)
        assert clause["block_size"]["const"] == sch.block_size
        assert clause["padding"]["maximum"] == sch.block_size - 1
        rule = clause["scale_rule"]
        assert (rule["enum"] if "enum" in rule else [rule["const"]]) == list(sch.scale_rules)


def test_spec_appendix_a_reproduces_the_schema_file(schema: dict) -> None:
    """The JSON block of Appendix A in spec/fp4fmt-v1.md is the schema file, member for member."""
    spec = SPEC_PATH.read_text(encoding="utf-8")
    start = spec.index("## Appendix A.")
    block = re.search(r"```json\n(.*?)\n```", spec[start:], re.S)
    assert block is not None, "Appendix A has no ```json block"
    assert json.loads(block.group(1)) == schema


@pytest.mark.parametrize(
    ("sub", "good", "bad"),
    [
        ({"type": "integer"}, 3, True),
        ({"type": "integer"}, 3.0, 3.5),
        ({"enum": [16, 32]}, 16, True),
        ({"const": "amax"}, "amax", "floor"),
        ({"pattern": "^sha256:[0-9a-f]{2}$"}, "sha256:0a", "sha256:0A"),
        ({"minimum": 0}, 0, -1),
        ({"maximum": 15}, 15, 16),
        ({"minItems": 1}, [0], []),
        ({"minLength": 1}, "x", ""),
        ({"items": {"type": "integer"}}, [1, 2], [1, "2"]),
        ({"required": ["a"]}, {"a": 1}, {"b": 1}),
        ({"properties": {"a": {"type": "string"}}}, {"a": "x"}, {"a": 1}),
        ({"additionalProperties": {"type": "string"}}, {"k": "v"}, {"k": 1}),
        ({"additionalProperties": False, "properties": {"a": {}}}, {"a": 1}, {"a": 1, "b": 2}),
        ({"allOf": [{"minimum": 0}, {"maximum": 1}]}, 1, 2),
        ({"if": {"const": "nvfp4"}, "then": {"minLength": 9}}, "mxfp4", "nvfp4"),
        ({"$ref": "#/$defs/s", "$defs": {"s": {"type": "string"}}}, "x", 1),
    ],
)
def test_validator_keyword(sub: dict, good: object, bad: object) -> None:
    """Each keyword of the test validator accepts a conforming value and rejects a violating one."""
    assert validate(good, sub) == []
    assert validate(bad, sub) != []


# ---------------------------------------------------------------------------------------------------------
# (b) Descriptors written by fp4fmt satisfy the schema
# ---------------------------------------------------------------------------------------------------------


def _values(shape: tuple[int, ...], dtype=np.float32, seed: int = 0) -> np.ndarray:
    """Small deterministic normal values of ``shape`` in ``dtype``."""
    return (np.random.default_rng(seed).standard_normal(shape) * 3).astype(dtype)


# (id, array, quantize keyword arguments)
WRITTEN_CASES: list[tuple[str, np.ndarray, dict]] = [
    ("nvfp4-2d", _values((8, 64)), {"scheme": "nvfp4"}),
    ("nvfp4-2d-swizzled-padded", _values((130, 40)), {"scheme": "nvfp4", "scale_layout": "swizzled"}),
    ("nvfp4-3d-swizzled", _values((2, 4, 32)), {"scheme": "nvfp4", "scale_layout": "swizzled"}),
    ("nvfp4-axis0", _values((20, 3)), {"scheme": "nvfp4", "axis": 0}),
    ("nvfp4-1d-tensor-scale", _values((20,)), {"scheme": "nvfp4", "tensor_scale": 0.01}),
    ("nvfp4-bf16", _values((4, 48), ml_dtypes.bfloat16), {"scheme": "nvfp4"}),
    ("nvfp4-f64", _values((3, 16), np.float64), {"scheme": "nvfp4"}),
    ("nvfp4-e4m3-source", _values((2, 16), ml_dtypes.float8_e4m3fn), {"scheme": "nvfp4"}),
    ("nvfp4-zero-size", np.zeros((0, 16), np.float32), {"scheme": "nvfp4"}),
    ("mxfp4-floor", _values((4, 64)), {"scheme": "mxfp4", "scale_rule": "floor"}),
    ("mxfp4-rceil", _values((4, 64)), {"scheme": "mxfp4", "scale_rule": "rceil"}),
    ("mxfp4-even", _values((4, 64)), {"scheme": "mxfp4", "scale_rule": "even"}),
    ("mxfp4-2d-swizzled-padded", _values((4, 40)), {"scheme": "mxfp4", "scale_layout": "swizzled"}),
    ("mxfp4-3d-axis1", _values((2, 3, 40)), {"scheme": "mxfp4", "axis": 1, "scale_rule": "even"}),
    ("mxfp4-1d-f16", _values((33,), np.float16), {"scheme": "mxfp4", "scale_rule": "rceil"}),
    ("mxfp4-axis0-3d-swizzled", _values((40, 2, 3)), {"scheme": "mxfp4", "axis": 0, "scale_layout": "swizzled"}),
]


@pytest.mark.parametrize(("case", "array", "kwargs"), WRITTEN_CASES, ids=[c[0] for c in WRITTEN_CASES])
def test_written_descriptor_satisfies_schema(
    tmp_path: Path, schema: dict, case: str, array: np.ndarray, kwargs: dict
) -> None:
    """save_file's descriptor for one QTensor (plus a plain tensor) is schema-valid and says what was written."""
    qt = fp4fmt.quantize(array, **kwargs)
    path = tmp_path / f"{case}.safetensors"
    fp4fmt.save_file({"w": qt, "bias": np.ones(3, np.float32)}, path)
    doc = read_descriptor(path)
    assert validate(doc, schema) == []
    entry = doc["tensors"]["w"]
    assert entry["scheme"] == kwargs["scheme"]
    assert entry["shape"] == list(array.shape)
    assert entry["axis"] == kwargs.get("axis", -1) % array.ndim
    assert entry["dtype"] == dtypes.dtype_name(array.dtype)
    assert entry["padding"] == qt.geometry.padded_k - array.shape[entry["axis"]]
    assert entry["scale_layout"] == kwargs.get("scale_layout", "linear")
    assert entry["scale_rule"] == kwargs.get("scale_rule", schemes.SCHEMES[kwargs["scheme"]].default_rule)
    assert set(doc["checksums"]) == {"bias", *TensorDescriptor(
        "w", qt.scheme, qt.shape, qt.dtype, qt.axis, qt.scale_layout, qt.scale_rule).part_names().values()}
    with fp4fmt.safe_open(path) as f:  # and the reference reader accepts and verifies it
        f.verify()


def test_descriptor_of_a_multi_tensor_file_satisfies_schema(tmp_path: Path, schema: dict) -> None:
    """All cases in one file, with plain tensors (one named like a part of a non-existent tensor)."""
    tensors: dict[str, object] = {case: fp4fmt.quantize(a, **kw) for case, a, kw in WRITTEN_CASES}
    tensors["norm"] = np.ones(8, ml_dtypes.bfloat16)
    tensors["step"] = np.array(7, np.int64)
    tensors["x.codes"] = np.zeros(4, np.uint8)
    path = tmp_path / "all.safetensors"
    fp4fmt.save_file(tensors, path, metadata={"format": "pt"})
    doc = read_descriptor(path)
    assert validate(doc, schema) == []
    assert sorted(doc["tensors"]) == sorted(c[0] for c in WRITTEN_CASES)


def test_conformance_vectors_satisfy_schema(schema: dict) -> None:
    """The descriptor of every spec/vectors/*.fp4.safetensors is schema-valid."""
    files = sorted(VECTORS.glob("*.fp4.safetensors"))
    assert files, f"no conformance vectors found in {VECTORS}"
    for path in files:
        assert validate(read_descriptor(path), schema) == [], path.name


# ---------------------------------------------------------------------------------------------------------
# (c) Broken descriptors: rejected by the schema and by descriptor.parse
# ---------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def good_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A valid file with a 2-D NVFP4 tensor ``w``, a 1-D MXFP4 tensor ``v`` and a plain ``bias``."""
    path = tmp_path_factory.mktemp("schema") / "good.safetensors"
    fp4fmt.save_file(
        {
            "w": fp4fmt.quantize(_values((4, 32)), "nvfp4"),
            "v": fp4fmt.quantize(_values((64,)), "mxfp4"),
            "bias": np.zeros(4, np.float32),
        },
        path,
    )
    return path


def _set(tensor: str, field: str, value: object) -> Callable[[dict], None]:
    """A mutation that sets ``field`` of tensor entry ``tensor``."""

    def mutate(doc: dict) -> None:
        doc["tensors"][tensor][field] = value

    return mutate


def _delete(*keys: str) -> Callable[[dict], None]:
    """A mutation that deletes the member at the path ``keys``."""

    def mutate(doc: dict) -> None:
        node = doc
        for k in keys[:-1]:
            node = node[k]
        del node[keys[-1]]

    return mutate


def _set_top(key: str, value: object) -> Callable[[dict], None]:
    """A mutation that sets a top-level member of the descriptor."""

    def mutate(doc: dict) -> None:
        doc[key] = value

    return mutate


def _uppercase_checksum(doc: dict) -> None:
    """Write one checksum's hex digits in upper case (the prefix stays ``sha256:``)."""
    doc["checksums"]["w.codes"] = doc["checksums"]["w.codes"].upper().replace("SHA256:", "sha256:")


# (id, mutation, exception type, tensor the error names or None, fragment of the rule)
BROKEN: list[tuple[str, Callable[[dict], None], type, str | None, str]] = [
    ("unknown-scheme", _set("w", "scheme", "nvfp5"), FormatError, "w", "unknown scheme 'nvfp5'"),
    ("scheme-not-a-string", _set("w", "scheme", ["nvfp4"]), FormatError, "w", "unknown scheme"),
    ("missing-padding", _delete("tensors", "w", "padding"), FormatError, "w", "missing field(s) padding"),
    ("negative-axis", _set("w", "axis", -1), FormatError, "w", "axis must be an integer in [0, 2)"),
    ("block-size-of-other-scheme", _set("w", "block_size", 32), FormatError, "w", "block_size of nvfp4 must be 16"),
    ("rule-of-other-scheme", _set("w", "scale_rule", "floor"), FormatError, "w", "scale_rule of nvfp4 must be one of"),
    ("unknown-rule", _set("v", "scale_rule", "ceil"), FormatError, "v", "scale_rule of mxfp4 must be one of"),
    ("unknown-layout", _set("w", "scale_layout", "tiled"), FormatError, "w", "scale_layout must be one of"),
    ("swizzled-1d", _set("v", "scale_layout", "swizzled"), FormatError, "v", "swizzled scale layout needs at least 2"),
    ("empty-quantizer", _set("w", "quantizer", ""), FormatError, "w", "quantizer must be a non-empty string"),
    ("padding-out-of-range", _set("v", "padding", 32), FormatError, "v", "padding must be 0"),
    ("empty-shape", _set("w", "shape", []), FormatError, "w", "shape must be a non-empty list"),
    ("negative-dim", _set("w", "shape", [-4, 32]), FormatError, "w", "shape must be a non-empty list"),
    ("int-source-dtype", _set("w", "dtype", "I32"), FormatError, "w", "dtype must be one of"),
    ("uppercase-checksum", _uppercase_checksum, FormatError, "w.codes", "64 lowercase hex digits"),
    ("no-checksums", _delete("checksums"), FormatError, None, "'checksums' must be a JSON object"),
    ("tensors-not-object", _set_top("tensors", []), FormatError, None, "'tensors' must be a JSON object"),
    ("no-version", _delete("format_version"), FormatError, None, "no format_version"),
    ("version-not-major-minor", _set_top("format_version", "1"), FormatError, None, "'MAJOR.MINOR'"),
    ("version-leading-zero", _set_top("format_version", "1.01"), FormatError, None, "'MAJOR.MINOR'"),
    ("version-2", _set_top("format_version", "2.0"), UnsupportedVersionError, None, "version 2.0 is not supported"),
    ("version-0", _set_top("format_version", "0.9"), UnsupportedVersionError, None, "version 0.9 is not supported"),
]


def _assert_rejected(path: Path, exc: type, tensor: str | None, fragment: str) -> None:
    """Reading ``path`` raises ``exc`` whose message names the file, the tensor and the rule."""
    with pytest.raises(exc) as info:
        fp4fmt.load_file(path)
    err = info.value
    assert type(err) is exc
    assert err.file == str(path)
    assert err.tensor == tensor
    assert fragment in err.rule, err.rule
    assert str(path) in str(err)
    if tensor is not None:
        assert f"tensor {tensor!r}" in str(err)


@pytest.mark.parametrize(("case", "mutate", "exc", "tensor", "fragment"), BROKEN, ids=[c[0] for c in BROKEN])
def test_broken_descriptor_is_rejected_by_schema_and_parse(
    tmp_path: Path, good_file: Path, schema: dict, case: str, mutate, exc: type, tensor: str | None, fragment: str
) -> None:
    """Each mutation breaks a rule the schema states; both the schema and the reader reject it."""
    assert validate(read_descriptor(good_file), schema) == []  # the unmutated file is valid
    bad = rewrite_descriptor(good_file, tmp_path / f"{case}.safetensors", mutate)
    assert validate(read_descriptor(bad), schema) != []
    _assert_rejected(bad, exc, tensor, fragment)


def _duplicate_format_version(text: str) -> str:
    """Prepend a second ``format_version`` member to the descriptor text."""
    assert text.startswith("{")
    return '{"format_version":"1.0",' + text[1:]


def _add_checksum_for_missing(doc: dict) -> None:
    """List a checksum for a tensor the file does not store."""
    doc["checksums"]["ghost"] = "sha256:" + "0" * 64


def _rename_tensor(old: str, new: str) -> Callable[[dict], None]:
    """A mutation that renames a tensor entry (its parts keep their old names)."""

    def mutate(doc: dict) -> None:
        doc["tensors"][new] = doc["tensors"].pop(old)

    return mutate


# Rules JSON Schema cannot state (§3.5): the schema accepts these documents, the reader does not.
# (id, text edit, exception type, tensor or None, fragment of the rule)
BLIND_SPOTS: list[tuple[str, Callable[[str], str], type, str | None, str]] = [
    ("wrong-padding-in-range", _doc(_set("w", "padding", 3)), FormatError, "w", "padding must be 0"),
    ("axis-past-rank", _doc(_set("w", "axis", 2)), FormatError, "w", "axis must be an integer in [0, 2)"),
    ("checksum-for-missing-tensor", _doc(_add_checksum_for_missing), FormatError, None, "'ghost', which is not in"),
    ("stored-tensor-without-checksum", _doc(_delete("checksums", "bias")), FormatError, None, "no checksum for stored"),
    ("part-claimed-missing", _doc(_rename_tensor("w", "u")), FormatError, "u", "part 'u.codes' is missing"),
    ("quantized-name-is-stored", _doc(_rename_tensor("w", "bias")), FormatError, "bias", "must not also be a stored"),
    ("duplicate-key", _duplicate_format_version, FormatError, None, "duplicate key 'format_version'"),
    ("block-size-written-16.0", _doc(_set("w", "block_size", 16.0)), FormatError, "w", "block_size of nvfp4 must"),
    ("padding-written-0.0", _doc(_set("v", "padding", 0.0)), FormatError, "v", "padding must be 0"),
]


@pytest.mark.parametrize(("case", "edit", "exc", "tensor", "fragment"), BLIND_SPOTS, ids=[c[0] for c in BLIND_SPOTS])
def test_rules_beyond_the_schema_are_enforced_by_parse(
    tmp_path: Path, good_file: Path, schema: dict, case: str, edit, exc: type, tensor: str | None, fragment: str
) -> None:
    """What §3.5 lists as outside the schema passes the schema and is still rejected by the reader."""
    bad = rewrite_descriptor_text(good_file, tmp_path / f"{case}.safetensors", edit)
    assert validate(read_descriptor(bad), schema) == []
    _assert_rejected(bad, exc, tensor, fragment)


def test_minor_version_additions_pass_schema_and_parse(tmp_path: Path, good_file: Path, schema: dict) -> None:
    """Unknown members and a newer minor version are accepted, and the tensors decode as before (§1.2)."""

    def mutate(doc: dict) -> None:
        doc["format_version"] = "1.7"
        doc["x_future"] = {"nested": [1, 2.5, None]}
        doc["tensors"]["w"]["x_note"] = "calibrated"

    newer = rewrite_descriptor(good_file, tmp_path / "newer.safetensors", mutate)
    assert validate(read_descriptor(newer), schema) == []
    before, after = fp4fmt.load_file(good_file), fp4fmt.load_file(newer)
    assert sorted(after) == sorted(before)
    for name in ("w", "v"):
        np.testing.assert_array_equal(fp4fmt.dequantize(after[name]), fp4fmt.dequantize(before[name]))
    with fp4fmt.safe_open(newer) as f:
        assert f.descriptor.version == "1.7"
        f.verify()
