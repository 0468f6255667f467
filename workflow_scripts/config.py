"""Configuration: JSON-schema validation (with defaults) plus the cross-references a schema cannot express.

Errors name the key path and what was expected, and are raised before any job runs.
"""

from __future__ import annotations

import copy
import functools
import json
import logging
import math
from pathlib import Path

import jsonschema
import yaml

log = logging.getLogger(__name__)

SCHEMA_PATH = Path(__file__).with_name("config.schema.yaml")
CHUNK_KEYS = ("chunk_steps", "runtime")  # how training is split into jobs: the trained weights do not depend on it
# the keys of a Hugging Face model config that give its context (its number of positions), first found wins: in
# a local model's config.json at config time, and in the loaded model's config in its identity (lm.describe)
CONTEXT_KEYS = ("n_positions", "max_position_embeddings", "n_ctx", "max_sequence_length", "seq_length")


def context_length(model_config) -> tuple[int, str] | tuple[None, None]:
    """(number of positions, the config key that gives it) of a Hugging Face model config, a loaded one or its
    config.json as a dict; (None, None) when it gives none."""
    for key in CONTEXT_KEYS:
        n = model_config.get(key) if isinstance(model_config, dict) else getattr(model_config, key, None)
        if isinstance(n, int) and not isinstance(n, bool):
            return n, key
    return None, None


class ConfigError(ValueError):
    pass


def _with_defaults(validator_cls):
    validate_props = validator_cls.VALIDATORS["properties"]

    def set_defaults(validator, properties, instance, schema):
        if isinstance(instance, dict):
            for key, sub in properties.items():
                if "default" in sub and key not in instance:
                    instance[key] = copy.deepcopy(sub["default"])  # the schema's own stays as written
        yield from validate_props(validator, properties, instance, schema)

    # YAML gives floats such as 2048.0 (an "integer" to draft 2020-12, but not usable as a count) and .nan/.inf
    # (which pass every minimum/maximum, as comparisons with NaN are false): refuse both as the wrong type
    types = validator_cls.TYPE_CHECKER.redefine_many(
        {
            "integer": lambda _, x: isinstance(x, int) and not isinstance(x, bool),
            "number": lambda _, x: (
                (isinstance(x, int) and not isinstance(x, bool)) or (isinstance(x, float) and math.isfinite(x))
            ),
        }
    )
    return jsonschema.validators.extend(validator_cls, {"properties": set_defaults}, type_checker=types)


def _deepest(error):
    """For a oneOf / anyOf failure, the error of the alternative that got furthest into the value (an object
    with a bad field names the field, not the whole object); other errors as they are."""
    while error.context:  # deepest first; at equal depth an alternative of the value's own type over a type mismatch
        error = max(error.context, key=lambda e: (len(e.absolute_path), e.validator not in ("type", "const", "enum")))
    return error


def _path(error) -> str:
    return ".".join(str(p) for p in error.absolute_path) or "<top level>"


SHOWN_CHARS = 300  # a value quoted in an error is cut to this many characters (a YAML alias bomb expands to GBs)


def _shown(message: str) -> str:
    if len(message) <= SHOWN_CHARS:
        return message
    return f"{message[:SHOWN_CHARS]}... ({len(message):,} characters)"


MAX_VALUES = 1_000_000  # values in a config, aliases expanded: a config with more is a YAML alias bomb, not a plan


def _count_values(node, limit: int = MAX_VALUES) -> int:
    """The number of values in ``node`` with every alias expanded, counted up to ``limit`` (it stops there)."""
    n, stack = 0, [node]
    while stack and n <= limit:
        x = stack.pop()
        n += 1
        if isinstance(x, dict):
            stack.extend(x.values())
        elif isinstance(x, list):
            stack.extend(x)
    return n


def read_shipped_yaml(path: Path) -> object:
    """A YAML file that ships with the package (the schema, the task registry): parsed by libyaml where PyYAML
    has it, about 7 times faster than its Python parser and the same SafeLoader values. A user's config goes
    through ``read_yaml`` instead, whose errors name the file, key and lines."""
    return yaml.load(path.read_text(encoding="utf-8"), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))  # noqa: S506


@functools.cache
def _schema() -> dict:
    return read_shipped_yaml(SCHEMA_PATH)


@functools.cache
def _validator():
    return _with_defaults(jsonschema.Draft202012Validator)(_schema())


def validate(config: dict) -> dict:
    """Validate ``config`` in place (filling defaults) and return it; raise ``ConfigError`` naming the key."""
    if _count_values(config) > MAX_VALUES:
        raise ConfigError(f"invalid config: more than {MAX_VALUES:,} values once its YAML aliases are expanded (an "
                          "alias bomb?)")
    validator = _validator()
    errors = sorted(map(_deepest, validator.iter_errors(config)), key=lambda e: (len(e.absolute_path), _path(e)))
    if errors:
        lines = []
        for e in errors[:10]:
            if e.validator == "additionalProperties":
                allowed = sorted(e.schema.get("properties", {}))
                lines.append(f"config key {_path(e)}: {_shown(e.message)} (allowed keys: {', '.join(allowed)})")
            else:
                lines.append(f"config key {_path(e)}: {_shown(e.message)}")
        raise ConfigError("invalid config:\n  " + "\n  ".join(lines))
    _cross_check(config)
    return config


def defaults(*path: str) -> dict:
    """The schema's defaults of the section at ``path`` (its keys), e.g. ``defaults("analyses", "macondo",
    "generate")``: for code that takes a section by hand, so that no default is written twice."""
    node = _schema()
    for key in path:
        node = node["properties"][key]
    return {k: copy.deepcopy(v["default"]) for k, v in node["properties"].items() if "default" in v}


def _refuse_case_twins(where: str, names) -> None:
    """Names that become folder names under results/ must differ by more than case: on a case-insensitive
    filesystem (macOS, Windows) `Test` and `test` are one folder and their files would overwrite each other."""
    seen: dict[str, str] = {}
    for name in names:
        other = seen.setdefault(name.casefold(), name)
        if other != name:
            raise ConfigError(
                f"config key {where}: {other!r} and {name!r} differ only by case; they name the same folder under "
                "results/ on a case-insensitive filesystem: rename one"
            )


def _cross_check(c: dict) -> None:
    def need(kind, name, where):
        if name not in c[kind]:
            raise ConfigError(f"config key {where}: {name!r} is not one of the {kind} ({', '.join(c[kind])})")

    for kind in ("corpora", "models", "datastores", "eval_sets"):
        _refuse_case_twins(kind, c[kind])
    t = c.get("tasks") or {}
    _refuse_case_twins("tasks.custom", t.get("custom") or {})
    _refuse_case_twins("tasks.evaluate", dict.fromkeys(n for ns in (t.get("evaluate") or {}).values() for n in ns))

    for m, spec in c["models"].items():
        if spec["source"] == "train":
            need("corpora", spec["train"]["corpus"], f"models.{m}.train.corpus")
            if spec["train"]["n_embd"] % spec["train"]["n_head"]:
                raise ConfigError(f"config key models.{m}.train.n_head: must divide n_embd")
            if c["extraction"]["block_size"] > spec["train"]["block_size"]:
                raise ConfigError(
                    f"config key extraction.block_size: {c['extraction']['block_size']} exceeds "
                    f"models.{m}.train.block_size = {spec['train']['block_size']}"
                )
    for name, spec in c["corpora"].items():
        if spec["source"] == "local":
            for split, files in spec["local"]["files"].items():
                for f in [files] if isinstance(files, str) else files:
                    if not Path(f).is_file():
                        raise ConfigError(f"config key corpora.{name}.local.files.{split}: file {f} does not exist")
                    if Path(f).stat().st_size == 0:
                        raise ConfigError(f"config key corpora.{name}.local.files.{split}: file {f} is empty")
            files = spec["local"]["files"]
            paths = {s: [Path(f).resolve() for f in ([files[s]] if isinstance(files[s], str) else files[s])]
                     for s in ("train", "valid", "test")}
            _warn_shared_sources(f"corpora.{name}.local.files", paths, "list %s")
        if spec["source"] == "hf" and spec["hf"].get("splits"):
            hub = {s: [spec["hf"]["splits"][s]] for s in ("train", "valid", "test")}
            _warn_shared_sources(f"corpora.{name}.hf.splits", hub, "name split %r")
    for e, spec in c["eval_sets"].items():
        need("corpora", spec["corpus"], f"eval_sets.{e}.corpus")
    block = c["extraction"]["block_size"]
    for d, spec in c["datastores"].items():  # how a datastore is cut into shards (a subsample: its parent's)
        if "subsample" in spec:
            continue
        if "shards" in spec and "shard_tokens" in spec:
            raise ConfigError(f"config key datastores.{d}: shards ({spec['shards']}) and shard_tokens "
                              f"({spec['shard_tokens']}) are two ways to cut it into shards; set one")
        if "shard_tokens" in spec and spec["shard_tokens"] % block:
            raise ConfigError(f"config key datastores.{d}.shard_tokens: {spec['shard_tokens']} is not a multiple of "
                              f"extraction.block_size ({block}); shards must start on a block so that their keys do "
                              f"not depend on the cut (e.g. {max(1, round(spec['shard_tokens'] / block)) * block})")
        if "shard_tokens" not in spec:
            spec.setdefault("shards", 1)
    for d, spec in c["datastores"].items():  # a subsample is its parent's model, corpus, split and shards
        if "subsample" in spec:
            of = spec["subsample"]["of"]
            need("datastores", of, f"datastores.{d}.subsample.of")
            parent = c["datastores"][of]
            if "subsample" in parent:
                raise ConfigError(f"config key datastores.{d}.subsample.of: {of} is itself a subsample; name its "
                                  f"parent ({parent['subsample']['of']}) with the fraction you want")
            for k in ("model", "corpus"):  # (validating twice finds the parent's, filled in the first time)
                if k in spec and spec[k] != parent[k]:
                    raise ConfigError(f"config key datastores.{d}.{k}: a subsample takes its {k} from "
                                      f"datastores.{of} ({parent[k]}); leave it out")
            for k in ("shards", "shard_tokens", "stride"):
                spec.pop(k, None)
            spec.update({k: parent[k] for k in ("model", "corpus", "split", "shards", "shard_tokens", "stride")
                         if parent.get(k) is not None})
    for kind in ("datastores", "eval_sets"):
        for name, spec in c[kind].items():
            if (spec.get("stride") or 1) > block:
                raise ConfigError(f"config key {kind}.{name}.stride: {spec['stride']} exceeds extraction.block_size "
                                  f"({block}); a window advances by at most its length")
    for d, spec in c["datastores"].items():
        need("models", spec["model"], f"datastores.{d}.model")
        need("corpora", spec["corpus"], f"datastores.{d}.corpus")
        if "select_on" in spec:
            need("eval_sets", spec["select_on"], f"datastores.{d}.select_on")
    # every eval set is retrieved and swept against every datastore (rules/common.smk SWEEPS)
    for e, spec in c["eval_sets"].items():
        for d, ds in c["datastores"].items():
            shared = _split_sources(c, spec["corpus"], spec["split"]) & _split_sources(c, ds["corpus"], ds["split"])
            if shared and not spec["allow_datastore_overlap"]:
                via = "" if spec["corpus"] == ds["corpus"] else (
                    f"; corpora.{spec['corpus']} and corpora.{ds['corpus']} resolve to the same "
                    f"{', '.join(sorted(str(x[0]) + ' ' + str(x[1]) for x in shared))}")
                raise ConfigError(
                    f"config key eval_sets.{e}: corpus {spec['corpus']}, split {spec['split']} is the text of "
                    f"datastores.{d} (datastores.{d}.corpus = {ds['corpus']}, datastores.{d}.split = {ds['split']}"
                    f"{via}), which this set is scored against: every target is among its neighbours, so its "
                    f"perplexity says nothing of held-out text. Use another split, or set "
                    f"eval_sets.{e}.allow_datastore_overlap: true if this is what you mean"
                )
    for d, ds in c["datastores"].items():
        model = c["models"][ds["model"]]
        if model["source"] == "local":
            _check_local_context(c["extraction"]["block_size"], ds["model"], d, Path(model["path"]))
    for i, d in enumerate((c.get("scaling") or {}).get("datastores", [])):
        need("datastores", d, f"scaling.datastores.{i}")
    sw = c["sweep"]
    if sw.get("k_max") is None:
        sw["k_max"] = max(sw["ks"])
    elif sw["k_max"] < max(sw["ks"]):
        raise ConfigError(
            f"config key sweep.k_max: {sw['k_max']} is smaller than the largest k in sweep.ks "
            f"({max(sw['ks'])}); retrieval must fetch at least max(ks) neighbours"
        )
    ix = c["index"]
    if ix["type"] == "IVFPQ" and max(ix["nlist"], 2 ** ix["nbits"]) > ix["train_sample"]:
        raise ConfigError(
            f"config key index.train_sample: {ix['train_sample']} keys cannot train index.nlist = {ix['nlist']} lists "
            f"and 2^index.nbits = {2 ** ix['nbits']} codes per sub-quantizer (k-means needs at least as many keys as "
            f"centroids); raise index.train_sample or lower nlist / nbits"
        )
    if c["index"]["type"] == "Flat" and c["index"].get("distances") == "pq":
        raise ConfigError(
            "config key index.distances: pq keeps an IVFPQ index's approximate distances; a Flat index's are exact "
            "(use index.type IVFPQ, or distances exact)"
        )
    for d, point in ((c.get("tasks") or {}).get("points") or {}).items():
        need("datastores", d, f"tasks.points.{d}")
        if point["k"] > sw["k_max"]:
            raise ConfigError(
                f"config key tasks.points.{d}.k: {point['k']} exceeds sweep.k_max = {sw['k_max']}, the neighbours "
                "retrieval caches (raise sweep.k_max to score this point)"
            )
    a = c.get("analyses") or {}
    for key in ("macondo", "hurdle"):
        if key in a:
            need("models", a[key]["model"], f"analyses.{key}.model")
    if "hurdle" in a and "macondo" not in a:
        raise ConfigError(
            "config key analyses.hurdle: needs analyses.macondo too (its Macondo run trains on each seed's "
            "Macondo test sentences, generated as analyses.macondo.generate says)"
        )
    if "hurdle" in a and c["models"][a["hurdle"]["model"]]["source"] != "train":
        raise ConfigError("config key analyses.hurdle.model: must be a model trained here (source: train): its shape")
    if "macondo" in a:
        for name, spec in a["macondo"]["generate"].items():
            if name in ("given_names", "surnames", "cities", "universities", "companies", "child_names"):
                if spec not in ("shipped", "vocab") and not Path(spec).is_file():
                    raise ConfigError(f"config key analyses.macondo.generate.{name}: file {spec} does not exist")
                if spec == "vocab" and name != "child_names":
                    raise ConfigError(f"config key analyses.macondo.generate.{name}: 'vocab' is for child_names only")
    for key in ("projection", "mlp"):
        if key in a:
            need("datastores", a[key]["datastore"], f"analyses.{key}.datastore")
    ic = c["incontext"]
    for i, d in enumerate(ic["datastores"]):
        need("datastores", d, f"incontext.datastores.{i}")
        if "subsample" in c["datastores"][d]:
            raise ConfigError(f"config key incontext.datastores.{i}: datastore {d!r} is a subsample of another's "
                              "rows, not a corpus cut into passages; name the datastore it is a subsample of")
    room = ic["stride"] + ic["passages"] * ic["passage_tokens"]
    if ic["datastores"] and room > c["extraction"]["block_size"]:
        raise ConfigError(f"config key incontext.stride: {ic['stride']} + incontext.passages x passage_tokens "
                          f"({ic['passages']} x {ic['passage_tokens']}) exceed extraction.block_size = "
                          f"{c['extraction']['block_size']}: a stretch and its passages must fit in one window")
    if "projection" in a:
        need("eval_sets", a["projection"]["eval_set"], "analyses.projection.eval_set")
        for i, point in enumerate(a["projection"]["points"]):
            if point != "chosen" and point["k"] > sw["k_max"]:
                raise ConfigError(
                    f"config key analyses.projection.points.{i}.k: {point['k']} exceeds sweep.k_max = {sw['k_max']}, "
                    "the neighbours retrieval caches"
                )


def _split_sources(c: dict, corpus: str, split: str) -> set[tuple]:
    """What a corpus split's text comes from, so that two corpus names for one text compare equal: a generated
    corpus's spec (and seed) with the split, a local corpus's files (resolved), a hub dataset's split."""
    spec = c["corpora"][corpus]
    if spec["source"] == "generate":
        return {("generate spec", json.dumps({**spec["generate"], "seed": c.get("seed"), "split": split},
                                             sort_keys=True))}
    if spec["source"] == "local":
        files = spec["local"]["files"][split]
        return {("file", str(Path(f).resolve())) for f in ([files] if isinstance(files, str) else files)}
    hf = spec["hf"]
    name = (hf.get("splits") or {}).get(split, split)
    return {("dataset", f"{hf['path']} {hf.get('name')} {hf.get('revision')} split {name}")}


def _warn_shared_sources(prefix: str, sources: dict[str, list], names: str) -> None:
    """A source (a local file, a hub split) listed for two splits of a corpus: its text is in both (a datastore
    over one split and an eval set on the other would overlap). A warning, not an error: a smoke test may mean it.
    ``names``: how the message names the source ("list %s", "name split %r")."""
    splits: dict = {}
    for split, listed in sources.items():
        for src in listed:
            if split not in splits.setdefault(src, []):
                splits[src].append(split)
    for src, listed in splits.items():
        if len(listed) > 1:
            keys = ", ".join(f"{prefix}.{s}" for s in listed)
            log.warning(f"config keys %s all {names}: its text is in each of these splits", keys, src)


def _check_local_context(block_size: int, model: str, ds: str, path: Path) -> None:
    """extraction.block_size against the number of positions a local model's config.json gives, when there is
    one to read (the model_identity step records it for every model, and the steps check it again)."""
    cfg_file = path / "config.json"
    try:
        cfg = json.loads(cfg_file.read_text())
    except (OSError, ValueError):
        return
    n, key = context_length(cfg)
    if key is not None and block_size > n:
        raise ConfigError(
            f"config key extraction.block_size: {block_size} exceeds the context of models.{model} (datastores.{ds}"
            f"): {key} = {n} in {cfg_file}; set extraction.block_size to at most {n}"
        )


def training_chunks(steps: int, chunk_steps: int | None) -> list[tuple[int, int]]:
    """The (start, stop) steps of each training job: one job unless ``chunk_steps`` splits the run."""
    if not chunk_steps or chunk_steps >= steps:
        return [(0, steps)]
    return [(s, min(s + chunk_steps, steps)) for s in range(0, steps, chunk_steps)]


class _UniqueKeyLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses a key given twice in one mapping (PyYAML keeps the last silently)."""

    def construct_mapping(self, node, deep=False):
        seen = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if key in seen:
                raise ConfigError(
                    f"{self.name}: config key {_shown(str(key))!r} is given twice in one mapping (lines "
                    f"{seen[key]} and {key_node.start_mark.line + 1}); YAML would keep the last silently: keep one"
                )
            seen[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep)


def read_yaml(path) -> object:
    """A config file's YAML, with a key given twice in one mapping refused (naming the key, file and lines)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    with open(path, encoding="utf-8") as f:
        try:
            return yaml.load(f, Loader=_UniqueKeyLoader)  # noqa: S506 (a SafeLoader)
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML ({_shown(str(e))})") from e


def load(path) -> dict:
    config = read_yaml(path)
    if not isinstance(config, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    return validate(config)
