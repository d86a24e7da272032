"""Options and steps shared by the subcommands: the model, the inputs, the output folder."""
from __future__ import annotations

import argparse
import contextlib
import functools
import math
import os

from ..export import volumes  # its format registry; the module imports numpy only when it writes or reads

DEFAULT_BATCH = 32
#: the largest --permutations of a permutation test (p-values resolve 1e-6; more only costs time)
MAX_PERMUTATIONS = 1_000_000
#: the largest compare-classes --max-vectors-per-group (a sparse temporary file holds that many
#: gradient vectors per group)
MAX_VECTORS_PER_GROUP = 100_000
#: the largest topk --k (each kept activation of a shown map is projected back to the input)
MAX_TOPK = 1000
#: the most onnxruntime threads or concurrent parts: 4 per CPU (onnxruntime's threads spin while
#: they wait, so thousands of them on a few cores make a command crawl)
MAX_THREADS = 4 * (os.cpu_count() or 1)
#: the largest side of a rendered window in pixels (VTK's off-screen buffers stop well before)
MAX_WINDOW_SIDE = 16384


def add_model_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--model", "-m", default=None,
                   help="registry name (see `cnnvis models`), .onnx file or Caffe .prototxt "
                        "(default: the embedded default model)")
    g.add_argument("--weights", default=None, help="Caffe .caffemodel / .caffemodel.h5 for a .prototxt model")
    g.add_argument("--input-shape", default=None, metavar="C,H,W",
                   help="input shape of a Caffe model (a train/test prototxt whose data layer does not say it)")
    g.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"),
                   help="onnxruntime execution provider (auto: CUDA when available)")
    g.add_argument("--threads", type=thread_count, default=None,
                   help=f"onnxruntime intra-op threads (at most {MAX_THREADS}: 4 per CPU)")
    g.add_argument("--batch-size", type=positive_int, default=DEFAULT_BATCH,
                   help=f"images per onnxruntime call (bounds memory; default {DEFAULT_BATCH})")


def add_input_options(p: argparse.ArgumentParser, nargs: str = "*") -> None:
    p.add_argument("images", nargs=nargs, metavar="IMAGE",
                   help="image files or folders (default: the model's sample images)")
    g = p.add_argument_group("input")
    g.add_argument("--input-array", default=None, metavar="X.npy",
                   help="an already-preprocessed N×C×H×W float array instead of images")
    g.add_argument("--preprocess", default=None, metavar="PRESET",
                   help="preprocessing preset (default: the model's own)")


def add_output_options(p: argparse.ArgumentParser, default: str) -> None:
    p.add_argument("--out", "-o", default=default, help=f"output folder (default: {default})")
    p.add_argument("--debug", action="store_true", help="show tracebacks for errors")


def add_volume_format_option(p, what: str) -> None:
    """``--format/-f``: the volume formats of :data:`cnnvis.export.volumes.FORMATS` to write."""
    p.add_argument("--format", "-f", action="append", choices=tuple(volumes.FORMATS), default=None,
                   help=f"{what} (repeatable; default: all of {', '.join(volumes.FORMATS)})")


def volume_formats(args) -> list:
    """The formats ``--format`` chose, each once, in the order given (default: every format)."""
    return list(dict.fromkeys(args.format or volumes.FORMATS))


def positive_int(text: str) -> int:
    """An integer >= 1 (argparse type)."""
    return _checked_int(text, 1, None, "a positive integer")


def seed(text: str) -> int:
    """A random seed: an integer in [0, 2**32 - 1] (numpy's range) (argparse type)."""
    return _checked_int(text, 0, 2 ** 32 - 1, "a seed in [0, 4294967295]")



def thread_count(text: str) -> int:
    """A number of threads: an integer in [1, MAX_THREADS] (argparse type)."""
    return _checked_int(text, 1, MAX_THREADS, f"an integer in [1, {MAX_THREADS}] (4 per CPU)")


def nonnegative_int(text: str) -> int:
    """An integer >= 0 (argparse type)."""
    return _checked_int(text, 0, None, "an integer >= 0")


def int_range(low=None, high=None):
    """An argparse type: an integer in [low, high] (either end may be None: open)."""
    return functools.partial(_checked_int, low=low, high=high, what=_range_text("an integer", low, high))


def finite_float(text: str) -> float:
    """A finite number (no nan, inf) (argparse type)."""
    return _checked_float(text, None, None, "a finite number")


def positive_float(text: str) -> float:
    """A finite number > 0 (argparse type)."""
    return _checked_float(text, 0.0, None, "a finite number > 0", open_low=True)


def nonnegative_float(text: str) -> float:
    """A finite number >= 0 (argparse type)."""
    return _checked_float(text, 0.0, None, "a finite number >= 0")


def fraction(text: str) -> float:
    """A number in [0, 1] (argparse type)."""
    return _checked_float(text, 0.0, 1.0, "a number in [0, 1]")


def float_range(low=None, high=None):
    """An argparse type: a finite number in [low, high] (either end may be None: open)."""
    return functools.partial(_checked_float, low=low, high=high, what=_range_text("a finite number", low, high))


def memory_size(text: str) -> int:
    """A size in bytes: ``4G``, ``512M``, ``1.5GiB``, ``1000000`` (argparse type)."""
    from ..limits import parse_size

    try:
        return parse_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def writable_folder(text: str) -> str:
    """An existing folder this process can write in (argparse type), e.g. for temporary files."""
    if not os.path.isdir(text):
        raise argparse.ArgumentTypeError(f"expected an existing folder, got {text!r}"
                                         + (" (a file)" if os.path.exists(text) else ""))
    if not os.access(text, os.W_OK | os.X_OK):
        raise argparse.ArgumentTypeError(f"cannot write in folder {text!r}")
    return text


def _range_text(what: str, low, high) -> str:
    if low is not None and high is not None:
        return f"{what} in [{low}, {high}]"
    if low is not None:
        return f"{what} >= {low}"
    if high is not None:
        return f"{what} <= {high}"
    return what


def _checked_int(text, low=None, high=None, what: str = "an integer") -> int:
    """The one integer check of the command line: ``text`` as an int in [low, high]."""
    try:
        value = int(str(text).strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
    if (low is not None and value < low) or (high is not None and value > high):
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
    return value


def _checked_float(text, low=None, high=None, what: str = "a finite number", open_low: bool = False) -> float:
    """The one number check of the command line: ``text`` as a finite float in [low, high]
    (``(low, high]`` with ``open_low``); nan and inf are refused."""
    try:
        value = float(str(text).strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
    if not math.isfinite(value) or (low is not None and (value <= low if open_low else value < low)) \
            or (high is not None and value > high):
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
    return value


_shared_models = None  # while run-all runs: loaded models by what names them, for every step


@contextlib.contextmanager
def sharing_models():
    """Within this block, commands naming the same model share one loaded Model (run-all: a Caffe
    model is converted once, not once per step). Each command starts with its sessions released,
    so memory stays that of one command."""
    global _shared_models
    _shared_models = {}
    try:
        yield
    finally:
        _shared_models = None


def load_model(args):
    """The Model named by --model/--weights/--device/--threads (registry default when absent)."""
    from .. import registry

    spec = args.model or registry.default_model_name()
    input_shape = getattr(args, "input_shape", None)
    key = (spec, args.weights, args.device, args.threads, input_shape)
    if _shared_models is not None and key in _shared_models:
        model = _shared_models[key]
        model.release()
        return model
    model = registry.load(spec, weights=args.weights, device=args.device, threads=args.threads,
                          input_shape=input_shape)
    caffe_notes(model)
    if _shared_models is not None:
        _shared_models[key] = model
    return model


class Inputs:
    """The inputs of a command — ``--input-array`` or the image arguments (default: the model's
    samples) — as an indexable list: names, chunks from any start, any subset by index (second
    passes over a few images). Images are decoded when loaded; an array is read once.

    ``named``: positions of the image files named one by one (image arguments that are files, the
    model's sample images); the files listed from a folder, ``--image-tree`` or ``--image-list``
    are the dataset, whose unreadable files :meth:`readable_chunks` skips and records."""

    def __init__(self, args, model):
        from .. import preprocess

        self.args = args
        self.pre = preprocessing_for(args, model)
        self.sources = recorded_inputs(args, model)
        if args.input_array:
            self.array = preprocess.load_input_array(args.input_array, expected_shape=model.input_shape, what="--input-array")
            stem = os.path.splitext(os.path.basename(args.input_array))[0]
            self.names = [f"{stem}[{i}]" for i in range(len(self.array))]
            self.files = None
            self.labels = None
            self.named = ()
        else:
            self.array = None
            dataset = image_set(args)
            if dataset is not None:
                self.files, self.labels, self.named = dataset.files, dataset.labels, ()
            else:
                given = input_paths(args, model)
                self.files, self.labels = preprocess.list_images(given), None
                self.named = tuple(preprocess.named_positions(given, self.files))
            self.names = preprocess.display_names(self.files)

    def __len__(self):
        return len(self.names)

    def load(self, indices):
        """N×C×H×W float32 of the inputs at ``indices``."""
        from .. import preprocess

        indices = [int(i) for i in indices]
        if self.array is not None:
            return self.array[indices]
        return preprocess.load_batch([self.files[i] for i in indices], self.pre)

    def chunks(self, start: int = 0, size: int = DEFAULT_BATCH):
        """``(names, batch)`` of at most ``size`` inputs each, from input ``start`` on."""
        from .. import preprocess

        for s in range(start, len(self), size):
            e = min(s + size, len(self))
            batch = self.array[s:e] if self.array is not None else preprocess.load_batch(self.files[s:e], self.pre)
            yield self.names[s:e], batch

    def readable_chunks(self, start: int = 0, size: int = DEFAULT_BATCH, skipped: list | None = None):
        """``(names, batch, positions)`` per ``size`` run of the input list from input ``start`` on,
        through :func:`cnnvis.preprocess.read_chunk` (what a Dask worker reads a shard with): the
        unreadable files of the dataset are left out and appended to ``skipped`` as ``[position,
        path, reason]``; a run none of whose files can be read yields nothing. Names are the
        names in the whole input list (an image's name never depends on another one being
        readable)."""
        from .. import preprocess

        for s in range(start, len(self), size):
            e = min(s + size, len(self))
            if self.array is not None:
                yield self.names[s:e], self.array[s:e], list(range(s, e))
                continue
            positions, batch = preprocess.read_chunk(self.files[s:e], self.pre, s, skipped, self.named)
            if batch is not None:
                yield [self.names[p] for p in positions], batch, positions

    def subset(self, indices) -> "Inputs":
        """These inputs restricted to ``indices`` (in that order), with their names in the whole
        list (a run drops unreadable images this way)."""
        import copy

        indices = [int(i) for i in indices]
        out = copy.copy(self)
        out.names = [self.names[i] for i in indices]
        if self.array is not None:
            out.array = self.array[indices]
        else:
            out.files = [self.files[i] for i in indices]
            out.labels = None if self.labels is None else [self.labels[i] for i in indices]
            keep = set(self.named)
            out.named = tuple(j for j, i in enumerate(indices) if i in keep)
        return out

    def fingerprint(self) -> dict:
        """What identifies these inputs (for resumable state): the array's sha256, or the image
        arguments, the preprocessing and every image file's size, mtime and sha256 (in input order),
        so that a changed, added or removed image is noticed, not mixed in."""
        from ..manifest import sha256_file

        if self.array is not None:
            return {"input_array": str(self.args.input_array), "sha256": sha256_file(self.args.input_array)}
        files = []
        for path in self.files:
            try:
                st = os.stat(path)
                files.append({"path": str(path), "size": st.st_size, "mtime_ns": st.st_mtime_ns,
                              "sha256": sha256_file(path)})
            except OSError as exc:  # a listed file that is gone or unreadable: skipped when read
                files.append({"path": str(path), "error": exc.strerror or type(exc).__name__})
        return {"images": self.sources, "preprocessing": self.pre.to_dict(), "files": files}


def image_set(args):
    """The :class:`cnnvis.datasets.ImageSet` of ``--image-list`` or ``--image-tree`` (with
    ``--synsets``), or None when the inputs are image arguments."""
    from .. import datasets
    from ..errors import CnnvisError

    listed, tree = getattr(args, "image_list", None), getattr(args, "image_tree", None)
    if not listed and not tree:
        if getattr(args, "synsets", None):
            raise CnnvisError("--synsets: names the classes of an --image-tree; give --image-tree too")
        return None
    given = [o for o, v in (("IMAGE arguments", getattr(args, "images", None)), ("--image-list", listed),
                            ("--image-tree", tree), ("--input-array", getattr(args, "input_array", None))) if v]
    if len(given) > 1:
        raise CnnvisError(f"{given[1]}: give one of {' / '.join(given)}, not both")
    if listed:
        return datasets.image_list(listed)
    return datasets.image_tree(tree, getattr(args, "synsets", None))


def load_inputs(args, model):
    """``(names, batch)`` of every input at once (small sets)."""
    inputs = Inputs(args, model)
    return inputs.names, inputs.load(range(len(inputs)))


def iter_input_chunks(args, model):
    """``(names, batch)`` chunks of --batch-size (bounded memory: images are decoded per chunk)."""
    yield from Inputs(args, model).chunks(0, args.batch_size)


def checked_input_chunks(args, model, skipped: list | None = None):
    """:func:`iter_input_chunks` with the first chunk already read, so that bad inputs fail before
    the caller stages any output. With a ``skipped`` list (the dataset commands), unreadable files
    of folders and image sets are skipped and recorded there (:meth:`Inputs.readable_chunks`),
    and a run none of whose files can be read fails here (:func:`none_readable`)."""
    inputs = Inputs(args, model)
    if skipped is None:
        chunks = inputs.chunks(0, args.batch_size)
    else:
        chunks = ((names, batch) for names, batch, _ in inputs.readable_chunks(0, args.batch_size, skipped))
    first = next(chunks, None)
    if first is None:
        raise none_readable(len(inputs), skipped)

    def chain():
        yield first
        yield from chunks

    return chain()


def none_readable(n: int, skipped: list, group: str | None = None):
    """The one-line error of a run (or a compare-classes group) none of whose ``n`` input images
    can be read, in one process or on a cluster (the CLI names the command)."""
    from ..errors import CnnvisError

    example = f", e.g. {skipped[0][-1]}" if skipped else ""
    where = f"group {group}: " if group is not None else ""
    return CnnvisError(f"{where}none of the {n} input image(s) is readable{example}")


def report_skipped(command: str, skipped: list) -> None:
    """Say on stderr how many unreadable images a run skipped (manifest.json lists them)."""
    import sys

    if skipped:
        print(f"cnnvis {command}: skipped {len(skipped)} unreadable image(s), e.g. {skipped[0][-1]} "
              "(all listed in manifest.json)", file=sys.stderr)


def skipped_record(skipped: list) -> dict:
    """What manifest.json records of unreadable inputs: their count and, per file, its position in
    the input list (and its group, for compare-classes: ``[group, position, path, reason]``)."""
    files = []
    for entry in skipped:
        *group, position, path, reason = entry
        files.append({**({"group": group[0]} if group else {}), "position": int(position), "path": path,
                      "reason": reason})
    return {"count": len(skipped), "files": files}


def input_paths(args, model) -> list:
    """The image arguments, or the model's sample images when there are none."""
    return list(args.images) or default_images(model)


def preprocessing_for(args, model):
    from .. import preprocess

    if getattr(args, "preprocess", None):
        return preprocess.preset(args.preprocess, model.input_shape)
    return preprocess.for_model(model)


def recorded_inputs(args, model) -> list:
    """What a manifest records as the inputs: the --input-array file, or the images actually used."""
    if getattr(args, "input_array", None):
        return [str(args.input_array)]
    for option in ("image_list", "image_tree", "synsets"):  # a dataset: its list file or folder
        if getattr(args, option, None):
            return [str(getattr(args, o)) for o in ("image_list", "image_tree", "synsets") if getattr(args, o, None)]
    return [str(p) for p in input_paths(args, model)]


def model_checkpoints(model) -> list:
    """The training checkpoints a model ships: its sidecar's ``checkpoints`` (relative to the model
    file), those present; [] when it lists none."""
    from pathlib import Path

    listed = (model.sidecar or {}).get("checkpoints") or []
    if not listed or not model.source:
        return []
    base = Path(model.source).parent
    return [base / c for c in listed if (base / c).is_file()]


def default_images(model) -> list:
    from .. import registry

    return registry.sample_images(model)


def caffe_notes(model) -> None:
    """Say once (on stderr) what opening a Caffe train/test net as a deploy net changed."""
    import sys

    from ..caffe import caffe_notes as notes

    for note in notes(model.proto):
        print(f"cnnvis: note: {note}", file=sys.stderr)


def model_warning(model) -> None:
    """Say so when the model is untrained (its pictures show random filters, not learned ones)."""
    import sys

    if model.trained is False:
        print(f"cnnvis: note: model {model.name} is UNTRAINED (random weights): pictures show "
              "structure of the topology, not learned features", file=sys.stderr)


#: the longest output name in UTF-8 bytes (file systems allow 255; suffixes and _2 need room)
MAX_NAME_BYTES = 120


def safe_name(text: str) -> str:
    """A file-name-safe version of a layer or image name, for any input: letters and digits
    (Unicode, NFC-normalised), ``-_.+[]`` kept, everything else (``/``, newlines, controls,
    spaces) becomes ``_``; a name that would be hidden, all dots (``.``, ``..``) or start with ``-``
    (read as an option) gets a leading ``_``; a name longer than :data:`MAX_NAME_BYTES` is cut and
    ends in ``~`` + 8 hex digits of its hash, so distinct long names stay distinct."""
    import hashlib
    import unicodedata

    text = unicodedata.normalize("NFC", str(text))
    keep = "-_.+[]"
    name = "".join(ch if ch.isalnum() or ch in keep else "_" for ch in text) or "_"
    if name[0] in ".-":
        name = "_" + name
    if len(name.encode("utf-8")) > MAX_NAME_BYTES:
        digest = hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:8]
        cut = name.encode("utf-8")[:MAX_NAME_BYTES - 9].decode("utf-8", "ignore")
        name = f"{cut}~{digest}"
    return name


def unique_names(names, used: dict) -> list:
    """File-name-safe names, de-duplicated in order (cat, cat_2, ...); ``used`` (the names given so
    far) carries across chunks, so a real image named ``cat_2`` never shares a folder with a
    second ``cat``. Names equal but for case count as equal (Cat, cat_2): one folder each also on
    case-insensitive file systems."""
    out = []
    for name in names:
        base = safe_name(name)
        unique, k = base, 1
        while unique.casefold() in used:
            k += 1
            unique = f"{base}_{k}"
        used[unique.casefold()] = True
        out.append(unique)
    return out


def write_run_volumes(run, rel_base: str, array, formats, kind: str, meta: dict, **kwargs) -> None:
    """Check and prepare a volume, then register ``rel_base``.<fmt> (and each format's companion
    files) with ``run`` and write them: every check happens before a file is registered."""
    prep = volumes.prepare_volume(array, **kwargs)
    base = None
    for fmt in formats:
        rel = rel_base + volumes.volume_format(fmt).suffix
        base = run.path(rel, kind=f"{kind}-{fmt}", layer=meta.get("layer"), image=meta.get("image")).with_suffix("")
        for companion in volumes.companion_paths(rel):
            run.path(companion.as_posix(), kind=f"{kind}-{fmt}-companion", layer=meta.get("layer"))
    volumes.write_prepared(base, prep, formats)
