"""Loading a configuration: the defaults, then a preset (YAML), then dotted ``key=value`` overrides (the
official README's ``--config.a.b=v`` spelling too); :func:`to_dict` and :func:`field_docs` for the CLI."""
from __future__ import annotations

from dataclasses import fields, is_dataclass
from pathlib import Path
from typing import List, Optional, Sequence

from omegaconf import OmegaConf

from .schema import Config, ConfigError


def _preset_dir() -> Path:
    """The preset YAMLs: the source is the repository's top-level ``configs/``, which an installed
    wheel carries as ``lowmem_nablagfn/configs/`` (pyproject/setup.py map it there); a source checkout
    or an editable install reads ``configs/`` beside the package directory."""
    package = Path(__file__).resolve().parent.parent
    installed = package / "configs"
    return installed if installed.is_dir() else package.parent / "configs"


PRESET_DIR = _preset_dir()


def list_presets() -> List[str]:
    """Names of the shipped presets (``tiny_cpu``, ``sd15_rtx4090``, ...)."""
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def _normalise_override(arg: str) -> str:
    """Accept ``a.b=v``, ``--a.b=v``, ``config.a.b=v``, ``--config.a.b=v``, ``--seed=0``, ``--exp_name=x``."""
    arg = arg.lstrip("-")
    if "=" not in arg:
        raise ConfigError(f"override {arg!r} is not of the form key=value (e.g. model.reward_scale=1e4)")
    key, value = arg.split("=", 1)
    if key.startswith("config."):
        key = key[len("config."):]
    key = {"exp_name": "logging.run_name"}.get(key, key)
    return f"{key}={value}"


def _field_type(key: str):
    """The annotation of a dotted key's field (``str``, ``Optional[str]``, ...), or None if unknown."""
    import typing

    cls = Config
    *path, leaf = key.split(".")
    for name in path:
        cls = typing.get_type_hints(cls).get(name)
        if not is_dataclass(cls):
            return None
    return typing.get_type_hints(cls).get(leaf) if is_dataclass(cls) else None


def _is_text(tp) -> tuple:
    """(is a string field, may be None)."""
    import types
    import typing

    if tp is str:
        return True, False
    args = typing.get_args(tp)
    union = typing.get_origin(tp) in (typing.Union, getattr(types, "UnionType", typing.Union))
    return union and set(args) == {str, type(None)}, True


def _override_layer(arg: str):
    """One dotted override as a config layer.  A string field takes the text as written (YAML would
    read ``no``/``off``/``yes``/``on`` as booleans and ``null`` as None); one pair of surrounding quotes
    is dropped, and an optional string field (``reward.checkpoint``, ...) reads ``null`` as unset.
    Other fields are parsed as YAML (numbers, booleans, lists)."""
    key, value = _normalise_override(arg).split("=", 1)
    text, optional = _is_text(_field_type(key))
    if not text:
        return OmegaConf.from_dotlist([f"{key}={value}"])
    if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
        value = value[1:-1]
    elif optional and value == "null":
        value = None
    layer = OmegaConf.create()
    OmegaConf.update(layer, key, value, force_add=True)
    return layer


def _merge_override(merged, arg: str):
    """``merged`` with one dotted override.  A mapping option given whole (``reward.mix={a: 1, b: 2}``)
    replaces the preset's mapping, where a merge would keep the entries the override leaves out; one
    entry (``reward.mix.a=2``) is merged as any other option."""
    import typing

    layer = _override_layer(arg)
    key = _normalise_override(arg).split("=", 1)[0]
    if typing.get_origin(_field_type(key)) is dict:
        OmegaConf.update(merged, key, OmegaConf.select(layer, key), merge=False)
        return merged
    return OmegaConf.merge(merged, layer)


def _check_yaml_text(layer, source: str, prefix: str = "") -> None:
    """A preset's unquoted ``no``/``off``/``yes``/``on`` in a string field arrives as a YAML boolean:
    say so rather than let it become the string 'False'."""
    for name, value in layer.items() if OmegaConf.is_dict(layer) else []:
        key = f"{prefix}{name}"
        if OmegaConf.is_dict(value):
            _check_yaml_text(value, source, f"{key}.")
        elif isinstance(value, bool) and _is_text(_field_type(key))[0]:
            raise ConfigError(f"{key} in {source} is an unquoted yes/no/on/off/true/false, which YAML reads "
                              f"as a boolean, but the option is text; quote it, e.g. {name}: \"no\"")


def load_config(preset: Optional[str] = None, overrides: Sequence[str] = ()) -> Config:
    """Defaults, then a preset (name in ``configs/`` or a YAML path), then dotted overrides."""
    base = OmegaConf.structured(Config)
    layers = [base]
    if preset:
        path = Path(preset)
        if not path.suffix:
            path = PRESET_DIR / f"{preset}.yaml"
        if not path.is_file():
            raise ConfigError(f"preset {preset!r} not found; available: {', '.join(list_presets())} "
                              f"(or give a path to a YAML file)")
        layers.append(OmegaConf.load(path))
        _check_yaml_text(layers[-1], str(path))
    try:
        merged = OmegaConf.merge(*layers)
        for o in overrides:  # one at a time: a bad value is reported as the user typed it
            try:
                merged = _merge_override(merged, o)
            except ConfigError:
                raise
            except Exception as exc:
                key, value = _normalise_override(o).split("=", 1)
                if "duplicate key" in str(exc):  # YAML's message for {a: 1, a: 2}
                    raise ConfigError(f"bad configuration value {key}={value}: a key appears twice; give each "
                                      f"key once") from None
                tp = _field_type(key)
                if tp is None:
                    raise
                want = {int: "an integer", float: "a number", bool: "true or false"}.get(
                    tp, str(tp).replace("typing.", "").replace("<class '", "").replace("'>", ""))
                raise ConfigError(f"bad configuration value {key}={value}: expected {want} "
                                  f"(see `lowmem-nablagfn help-config`)") from None
    except ConfigError:
        raise
    except Exception as exc:  # OmegaConf names the bad key/value; re-raise as one clear error
        key = getattr(exc, "full_key", None)
        what = str(exc).split("\n")[0]
        raise ConfigError(f"bad configuration value{f' for {key}' if key else ''}: {what} "
                          f"(see `lowmem-nablagfn help-config`)") from None
    cfg: Config = OmegaConf.to_object(merged)
    explicit = any(OmegaConf.select(layer, "sampling.scheduler") is not None for layer in layers[1:]) or any(
        _normalise_override(o).split("=", 1)[0].strip() == "sampling.scheduler" for o in overrides)
    if not explicit:
        cfg.sampling.scheduler = family_sampler(cfg.pretrained.model, cfg.pretrained.revision)
    return cfg


def family_sampler(model: str, revision: Optional[str] = None) -> str:
    """The sampler of ``pretrained.model``'s family when the configuration names none: ``flow-sde`` for
    SD 3.x (flow matching needs it), else ``ddim``."""
    return "flow-sde" if is_sd3_family(model, revision) else "ddim"


def is_sd3_family(model: str, revision: Optional[str] = None) -> bool:
    """Whether ``pretrained.model`` is taken for SD 3.x before anything loads (the default sampler, the
    planner's architecture): what :func:`~.validation.is_sd3_model` reads (built-in names, a directory's or
    cached snapshot's ``model_index.json``), else, for an uncached hub id, whether its name says
    ``stable-diffusion-3`` (Stability AI's naming) — a wrong guess is refused by the loading check."""
    from .validation import is_sd3_model

    sd3 = is_sd3_model(model, revision)
    return "stable-diffusion-3" in model.lower() if sd3 is None else sd3


def to_dict(cfg: Config) -> dict:
    return OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)


def field_docs(cls=Config, prefix: str = "") -> List[tuple]:
    """(dotted key, default, docstring) for every leaf field: the CLI's ``--help-config``."""
    import ast
    import inspect

    out = []
    docs = {}
    try:
        tree = ast.parse(inspect.getsource(cls))
        body = tree.body[0].body
        for a, b in zip(body, body[1:]):
            if isinstance(a, ast.AnnAssign) and isinstance(b, ast.Expr) and isinstance(b.value, ast.Constant):
                docs[a.target.id] = " ".join(str(b.value.value).split())
    except (OSError, TypeError):
        pass
    inst = cls()
    for f in fields(cls):
        value = getattr(inst, f.name)
        if is_dataclass(value):
            out += field_docs(type(value), f"{prefix}{f.name}.")
        else:
            out.append((f"{prefix}{f.name}", value, docs.get(f.name, "")))
    return out
