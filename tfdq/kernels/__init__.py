"""Fused CPU kernels for tfdq's quantizers, compiled on first use.

``uniform_quantize.cc`` (next to this file) registers TensorFlow ops.
``TfdqUniformQuantize`` and ``TfdqUniformQuantizeGrad`` are the forward pass and
the straight-through backward pass of :func:`tfdq.ops.uniform_quantize`, each
one multi-threaded loop over the tensor on TensorFlow's CPU worker threads
(float32 only). The forward result is bit-identical to the TensorFlow
formulas of :mod:`tfdq.ops`; the parameter gradients are summed in double.
Two more, ``TfdqAddReluQuantize`` and its gradient, compute a residual
junction ``Q(relu(Q_a(a) + b))`` (the quantizer on a residual branch, the
sum with the shortcut, ReLU, the block output's unsigned quantizer) in one
pass forward and one backward: :func:`fused_relu_quantize` puts it in a
training step's graph where it finds those four ops (same values and
gradients; TensorFlow prunes the separate ops that nothing else reads).
``TfdqAffineQuantize`` and its gradient compute ``Q(x * scale + offset)``
with a scale and an offset per channel (the output pass of a
BatchNormalization, ``tf.nn.batch_normalization``'s ``x * inv + shift``, and
the quantizer after it) in one pass each way: :func:`fused_affine_quantize`
puts it in a training step's graph where a quantizer's input is that
product and sum (same values; the gradients of the separate ops, the
per-channel sums in double). ``TfdqAffineAddReluQuantize`` is the residual
junction with its branch's BatchNorm output pass in it,
``Q(relu(Q_a(x * scale + offset) + b))``: :func:`fused_relu_quantize`
builds it instead of ``TfdqAddReluQuantize`` where the branch is such a map.

The library is built the first time :func:`load` is called, with ``g++``
(or ``$CXX``) and TensorFlow's compile and link flags, into a cache folder
keyed by the TensorFlow version, the Python ABI and a hash of the source
and flags::

    ~/.cache/tfdq/kernels/<key>/tfdq_kernels.so    ($TFDQ_KERNEL_CACHE/<key>/...)

The compiler writes a temporary file that is renamed into place, under a
file lock, so concurrent processes never load a half-written library and
build it only once; then a sidecar ``tfdq_kernels.so.sha256`` records the
library's size and SHA-256. Later processes load the cached file (no
compiler needed) only when it matches its sidecar: a library truncated by a
kill or a full disk, or another file at that path, is rebuilt instead of
being handed to ``tf.load_op_library`` (which can die with a bus error on a
truncated file, beyond any Python ``except``). Temporary files of killed
builds are removed by the next build. When there is no compiler or the
build or load fails, :func:`load` logs one warning and returns None, and
tfdq keeps using its XLA path. ``TFDQ_CUSTOM_KERNELS=0`` turns the kernels
off.

Integration into :func:`tfdq.ops.uniform_quantize`::

    if kernels.usable(x):
        return kernels.uniform_quantize(x, d, q_max, signed)

:func:`usable` is true only while a gradient tape records (a training
step): graphs traced for inference (``model.export``, a concrete function
of ``model(x)``, TF Serving, the TFLite converter) use the XLA path and run
with plain TensorFlow, without this library.
"""

import hashlib
import logging
import os
import platform
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
import weakref

import tensorflow as tf

try:
    import fcntl
except ImportError:  # not POSIX: the atomic rename alone keeps loads safe
    fcntl = None

__all__ = [
    "add_relu_quantize",
    "affine_add_relu_quantize",
    "affine_quantize",
    "available",
    "library_path",
    "load",
    "uniform_quantize",
    "usable",
]

logger = logging.getLogger("tfdq")

ENV_ENABLE = "TFDQ_CUSTOM_KERNELS"
ENV_CACHE = "TFDQ_KERNEL_CACHE"

SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "uniform_quantize.cc")
LIBRARY_NAME = "tfdq_kernels.so"
SIDECAR_SUFFIX = ".sha256"

# -ffp-contract=off: no fused multiply-adds, every float operation rounds as
# TensorFlow's does (the forward result must be bit-identical).
# -fno-trapping-math lets GCC vectorize the selects and floor (values are
# unchanged); -fopenmp-simd enables the `omp simd` loop pragmas only (no
# OpenMP runtime).
CXXFLAGS = (
    "-std=c++17",
    "-O3",
    "-shared",
    "-fPIC",
    "-ffp-contract=off",
    "-fno-trapping-math",
    "-fopenmp-simd",
    "-Wno-deprecated-declarations",
)
BUILD_TIMEOUT_S = 600

_lock = threading.Lock()
_state = {"tried": False, "module": None, "gpu": None}


class KernelBuildError(RuntimeError):
    """The kernel library could not be compiled or loaded."""


def _enabled():
    from tfdq import config  # noqa: PLC0415 (tfdq.config imports nothing of tfdq)

    return config.get("custom_kernels")


def _tf_flags():
    return list(tf.sysconfig.get_compile_flags()), list(tf.sysconfig.get_link_flags())


def _cache_key():
    """``tf<version>-<python ABI>-<hash of source and flags>``."""
    compile_flags, link_flags = _tf_flags()
    digest = hashlib.sha256()
    with open(SOURCE, "rb") as f:
        digest.update(f.read())
    # Flags without the install paths (-I, -L): another environment with the
    # same TensorFlow version shares the build.
    for flag in (*CXXFLAGS, *compile_flags, *link_flags):
        if not flag.startswith(("-I", "-L")):
            digest.update(b"\0" + flag.encode())
    abi = sysconfig.get_config_var("SOABI") or (f"{sys.implementation.cache_tag}-{platform.machine()}")
    return f"tf{tf.__version__}-{abi}-{digest.hexdigest()[:16]}"


def cache_dir():
    """The folder of this build: ``$TFDQ_KERNEL_CACHE/<key>``, default ``~/.cache/tfdq/kernels``."""
    root = os.environ.get(ENV_CACHE) or os.path.join(os.path.expanduser("~"), ".cache", "tfdq", "kernels")
    return os.path.join(root, _cache_key())


def library_path():
    """Where the compiled library is (or will be) for this TensorFlow and source."""
    return os.path.join(cache_dir(), LIBRARY_NAME)


class _FileLock:
    """An exclusive ``flock`` on ``path`` (no-op where fcntl is missing)."""

    def __init__(self, path):
        self._path = path
        self._file = None

    def __enter__(self):
        if fcntl is not None:
            self._file = open(self._path, "a+")
            fcntl.flock(self._file.fileno(), fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc):
        if self._file is not None:
            fcntl.flock(self._file.fileno(), fcntl.LOCK_UN)
            self._file.close()


def _compiler():
    name = os.environ.get("CXX") or "g++"
    found = shutil.which(name)
    if found is None:
        raise KernelBuildError(f"no C++ compiler found ({name!r} is not on PATH)")
    return found


def _fingerprint(path):
    """``"<size> <sha256>"`` of the file at ``path``."""
    digest = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
            size += len(block)
    return f"{size} {digest.hexdigest()}"


def verified(path=None):
    """Whether the library at ``path`` is complete: it matches the size and
    SHA-256 that its sidecar recorded after a finished build."""
    path = path or library_path()
    try:
        with open(path + SIDECAR_SUFFIX) as f:
            recorded = f.read().strip()
        return recorded == _fingerprint(path)
    except OSError:
        return False


def _write_sidecar(path):
    folder = os.path.dirname(path)
    fd, tmp = tempfile.mkstemp(prefix=".tfdq_kernels.", suffix=".sha256.tmp", dir=folder)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(_fingerprint(path) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path + SIDECAR_SUFFIX)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _remove_stale_temporaries(folder):
    """Temporary files of builds killed before their rename (called under the
    build lock, so no build is running)."""
    for name in os.listdir(folder):
        if name.startswith(".tfdq_kernels.") and name.endswith(".tmp"):
            try:
                os.unlink(os.path.join(folder, name))
            except OSError:
                pass


def build(path=None, force=False):
    """Compile the library to ``path`` (default :func:`library_path`) unless a
    complete one is there (see :func:`verified`).

    Returns the path. Raises :class:`KernelBuildError` with the compiler's
    message when it fails.
    """
    path = path or library_path()
    if not force and verified(path):
        return path
    cxx = _compiler()
    folder = os.path.dirname(path)
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as e:
        raise KernelBuildError(f"cannot create the cache folder {folder}: {e}") from e
    with _FileLock(os.path.join(folder, ".lock")):
        if not force and verified(path):  # another process built it meanwhile
            return path
        _remove_stale_temporaries(folder)
        if os.path.exists(path):
            logger.warning(
                "tfdq: the cached kernel library %s does not match its recorded size and "
                "hash (damaged, or an older build): rebuilding it",
                path,
            )
        fd, tmp = tempfile.mkstemp(prefix=".tfdq_kernels.", suffix=".so.tmp", dir=folder)
        os.close(fd)
        compile_flags, link_flags = _tf_flags()
        command = [cxx, *CXXFLAGS, SOURCE, "-o", tmp, *compile_flags, *link_flags]
        logger.info("tfdq: compiling the CPU kernels (first use): %s", " ".join(command))
        # one visible line: the first training step otherwise looks stalled for ~10 s
        print(
            f"tfdq: building the CPU quantizer kernel (first use only, about 10 s; cached in {folder})",
            file=sys.stderr,
            flush=True,
        )
        started = time.monotonic()
        try:
            try:
                proc = subprocess.run(command, capture_output=True, text=True, timeout=BUILD_TIMEOUT_S)
            except (OSError, subprocess.SubprocessError) as e:
                raise KernelBuildError(f"running {cxx} failed: {e}") from e
            if proc.returncode != 0:
                errors = [line for line in proc.stderr.splitlines() if "error" in line]
                tail = "\n".join((errors or proc.stderr.splitlines())[-5:])
                raise KernelBuildError(f"{cxx} exited with {proc.returncode}:\n{tail}")
            os.chmod(tmp, 0o755)
            try:
                os.unlink(path + SIDECAR_SUFFIX)  # no sidecar while the library changes
            except FileNotFoundError:
                pass
            os.replace(tmp, path)  # atomic: readers see the old state or the whole file
            _write_sidecar(path)
            print(
                f"tfdq: CPU quantizer kernel built in {time.monotonic() - started:.0f} s",
                file=sys.stderr,
                flush=True,
            )
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    return path


def _build_and_load():
    path = library_path()
    built_now = not verified(path)
    build(path)
    try:
        return tf.load_op_library(path)
    except Exception as e:  # noqa: BLE001  (TF raises NotFoundError, OSError, ...)
        if built_now:
            raise KernelBuildError(f"loading {path} failed: {e}") from e
        first = e
    # A cached file that does not load (damaged, or built against another
    # TensorFlow build of the same version): rebuild it once.
    build(path, force=True)
    try:
        return tf.load_op_library(path)
    except Exception as e:  # noqa: BLE001
        raise KernelBuildError(f"loading {path} failed: {e} (before rebuilding: {first})") from e


@tf.autograph.experimental.do_not_convert
def load():
    """The loaded op library (a module with the ops), or None.

    None when ``TFDQ_CUSTOM_KERNELS=0`` or when building or loading failed
    (one warning, with the reason, per process). Thread-safe; the build
    runs at most once per process.
    """
    if not _enabled():
        return None
    with _lock:
        if not _state["tried"]:
            _state["tried"] = True
            try:
                _state["module"] = _build_and_load()
            except Exception as e:  # noqa: BLE001  (any failure means: use the XLA path)
                logger.warning("tfdq: custom CPU kernels unavailable, using the XLA path: %s", e)
                _state["module"] = None
        return _state["module"]


def _has_gpu():
    if _state["gpu"] is None:
        _state["gpu"] = bool(tf.config.list_physical_devices("GPU"))
    return _state["gpu"]


@tf.autograph.experimental.do_not_convert
def available():
    """Whether the kernels can be used: enabled, no GPU visible, and loaded.

    The ops are CPU-only; on a machine with a GPU they would pull every
    quantizer of a GPU graph onto the CPU, so they are not used there.
    """
    return _enabled() and not _has_gpu() and load() is not None


def _in_xla_context():
    """Whether the current trace is inside an XLA-compiled function (TF internals)."""
    from tfdq import _compat  # noqa: PLC0415

    return _compat.in_xla_context()


@tf.autograph.experimental.do_not_convert
def _require_kernels(instead):
    """Raise RuntimeError, naming what to use ``instead``, where tfdq's custom ops cannot run here."""
    if not available():
        raise RuntimeError(
            "tfdq's custom CPU kernels are not available (disabled, GPU present, or the build "
            f"failed; see the log); use {instead}"
        )
    if _in_xla_context():
        raise RuntimeError(
            "tfdq's custom CPU kernels cannot run inside an XLA-compiled function "
            f"(jit_compile=True); use {instead} there"
        )


def usable(x):
    """Whether :func:`uniform_quantize` can run on ``x`` here.

    True for a float32 ``x`` when :func:`available`, outside an XLA-compiled
    function (``jit_compile=True``, which cannot compile custom ops), and
    while a gradient tape records (a training step). Inference graphs
    therefore never hold tfdq's ops: a SavedModel or concrete function
    traced from a tfdq model runs with plain TensorFlow (the XLA path gives
    the same values bit for bit).
    """
    dtype = getattr(x, "dtype", None)
    return (
        dtype is not None
        and tf.as_dtype(dtype) == tf.float32
        and _gradients_recorded()
        and available()
        and not _in_xla_context()
    )


def _gradients_recorded():
    """Whether a gradient tape (or forward accumulator) may record here (TF internals)."""
    from tfdq import _compat  # noqa: PLC0415

    return _compat.gradients_may_be_recorded()


@tf.autograph.experimental.do_not_convert
def uniform_quantize(x, d, q_max, signed=True):
    """:func:`tfdq.ops.uniform_quantize` with the fused CPU kernels.

    Same forward values (bit for bit) and straight-through gradients:
    ``dx = dy`` inside the range, ``dd = sum(dy (Q - clip(x))) / d``,
    ``dq_max = sum(dy where x > q_max) - sum(dy where x < -q_max)`` (the
    second sum for signed only). ``x`` must be float32, ``d`` and ``q_max``
    scalars. Raises RuntimeError where the kernels are not available
    (see :func:`usable`).
    """
    x = tf.convert_to_tensor(x)
    if x.dtype != tf.float32:
        raise TypeError(f"tfdq.kernels.uniform_quantize supports float32 only, got {x.dtype.name}")
    _require_kernels("tfdq.ops.uniform_quantize")
    module = load()
    d = tf.cast(d, tf.float32)
    q_max = tf.cast(q_max, tf.float32)
    signed = bool(signed)

    @tf.custom_gradient
    def _quantize(x, d, q_max):
        q = module.tfdq_uniform_quantize(x, d, q_max, signed=signed)

        def grad(dy):
            gx, gd, gq = module.tfdq_uniform_quantize_grad(dy, x, q, d, q_max, signed=signed)
            return gx, gd, gq

        return q, grad

    q = _quantize(x, d, q_max)
    _remember(q, (x, d, q_max, signed))
    return q


# Whether a training step's graph fuses residual junctions (see
# fused_relu_quantize) and per-channel affine maps before a quantizer (see
# fused_affine_quantize); benchmarks turn them off to measure the separate ops.
FUSE_JUNCTIONS = True
FUSE_AFFINE = True

# graph -> {name of a quantized tensor: (names of x, d, q_max; signed)}: the
# outputs of uniform_quantize in the graphs being traced, so that a later
# quantizer can find the quantizer that produced an operand of a sum. Names
# only: a value that held the graph's tensors would keep its key alive.
_produced = weakref.WeakKeyDictionary()


def _remember(q, inputs):
    if tf.executing_eagerly() or not hasattr(q, "graph"):
        return
    x, d, q_max, signed = inputs
    if not all(getattr(t, "graph", None) is q.graph for t in (x, d, q_max)):
        return
    try:
        _produced.setdefault(q.graph, {})[q.name] = (x.name, d.name, q_max.name, signed)
    except TypeError:  # a graph that takes no weak reference: nothing to fuse
        pass


def _quantized_operand(t):
    """``(x, d, q_max, signed)`` if ``t`` is the output of :func:`uniform_quantize` in its graph."""
    found = _produced.get(t.graph, {}).get(t.name)
    if found is None:
        return None
    x, d, q_max, signed = found
    get = t.graph.get_tensor_by_name
    return get(x), get(d), get(q_max), signed


def _junction(r):
    """``(a, b, (d_a, q_max_a, signed_a))`` when ``r = relu(Q_a(a) + b)`` in the graph
    being traced (Q_a an earlier :func:`uniform_quantize`, ``a`` and ``b`` float32 of one
    static shape, only the batch size unknown); else None."""
    if tf.executing_eagerly() or not hasattr(r, "op") or r.op.type != "Relu":
        return None
    s = r.op.inputs[0]
    if s.op.type not in ("AddV2", "Add") or len(s.op.inputs) != 2:
        return None
    for first, second in ((0, 1), (1, 0)):
        found = _quantized_operand(s.op.inputs[first])
        if found is None:
            continue
        a, d_a, q_max_a, signed_a = found
        b = s.op.inputs[second]
        if (
            a.graph is r.graph
            and a.dtype == tf.float32
            and b.dtype == tf.float32
            and a.shape.rank is not None
            and a.shape.rank == b.shape.rank
            and a.shape.as_list() == b.shape.as_list()  # no broadcasting: the same static shape
            and None not in a.shape.as_list()[1:]
        ):
            return a, b, (d_a, q_max_a, signed_a)
    return None


@tf.autograph.experimental.do_not_convert
def fused_relu_quantize(r, d, q_max):
    """The unsigned ``uniform_quantize(r, d, q_max)`` of a residual junction as one op, or None.

    When ``r = relu(Q_a(a) + b)`` in the training step being traced, with
    ``Q_a`` an earlier :func:`uniform_quantize` (the quantizer that puts a
    residual branch on its grid), returns :func:`add_relu_quantize` of
    ``a`` and ``b``: the same values bit for bit and the same gradients (to
    ``a``, ``b`` and all four quantizer parameters) as the separate ops,
    which TensorFlow then prunes where nothing else reads them. Otherwise
    (no such pattern, eager mode, ``FUSE_JUNCTIONS`` off) None.
    """
    if not FUSE_JUNCTIONS:
        return None
    found = _junction(r)
    if found is None:
        return None
    a, b, (d_a, q_max_a, signed_a) = found
    affine = _affine(a) if FUSE_AFFINE else None
    if affine is not None:  # a = x * scale + offset: a BatchNorm's output on the branch
        x, scale, offset = affine
        return affine_add_relu_quantize(x, scale, offset, b, d_a, q_max_a, d, q_max, signed_a=signed_a)
    return add_relu_quantize(a, b, d_a, q_max_a, d, q_max, signed_a=signed_a)


@tf.autograph.experimental.do_not_convert
def add_relu_quantize(a, b, d_a, q_max_a, d, q_max, signed_a=True):
    """``Q(relu(Q_a(a) + b))`` with the fused kernels: one pass forward, one backward.

    ``Q_a = uniform_quantize(., d_a, q_max_a, signed_a)`` and ``Q`` the
    unsigned ``uniform_quantize(., d, q_max)``; ``a`` and ``b`` float32 of
    the same shape. Values and gradients are those of the separate ops
    (:func:`uniform_quantize`, ``tf.add``, ``tf.nn.relu``,
    :func:`uniform_quantize`), TensorFlow's ReluGrad included (the gradient
    is 0 where the sum is 0); the parameter gradients are the same sums in
    another order within each block. Raises RuntimeError where the kernels
    are not available (see :func:`usable`).
    """
    _require_kernels("the separate quantizers, Add and ReLU")
    module = load()
    a = tf.convert_to_tensor(a, tf.float32)
    b = tf.convert_to_tensor(b, tf.float32)
    scalars = [tf.cast(v, tf.float32) for v in (d_a, q_max_a, d, q_max)]
    signed_a = bool(signed_a)

    @tf.custom_gradient
    def _junction_op(a, b, d_a, q_max_a, d, q_max):
        q = module.tfdq_add_relu_quantize(a, b, d_a, q_max_a, d, q_max, signed_a=signed_a)

        def grad(dy):
            return module.tfdq_add_relu_quantize_grad(dy, a, b, d_a, q_max_a, d, q_max, signed_a=signed_a)

        return q, grad

    return _junction_op(a, b, *scalars)


def _per_channel(t, channels):
    """``t`` as a vector of ``channels`` elements if it holds one value per channel
    (shape ``[C]`` or ``[1, ..., 1, C]``, float32); else None."""
    shape = t.shape
    if t.dtype != tf.float32 or shape.rank is None or shape.rank < 1 or not shape.is_fully_defined():
        return None
    dims = shape.as_list()
    if dims[-1] != channels or any(k != 1 for k in dims[:-1]):
        return None
    return t if shape.rank == 1 else tf.reshape(t, [channels])


def _affine(y):
    """``(x, scale, offset)`` when ``y = x * scale + offset`` in the graph being traced,
    ``scale`` and ``offset`` one value per channel (last axis) and ``x`` float32 of ``y``'s
    shape (its channel count static); else None."""
    if tf.executing_eagerly() or not hasattr(y, "op"):
        return None
    while y.op.type == "Identity" and len(y.op.inputs) == 1:
        y = y.op.inputs[0]
    if y.op.type not in ("AddV2", "Add") or len(y.op.inputs) != 2:
        return None
    shape = y.shape
    if y.dtype != tf.float32 or shape.rank is None or shape.rank < 2 or shape[-1] is None:
        return None
    channels = int(shape[-1])
    for product, shift in ((0, 1), (1, 0)):
        m, o = y.op.inputs[product], y.op.inputs[shift]
        if m.op.type != "Mul" or len(m.op.inputs) != 2 or m.shape.as_list() != shape.as_list():
            continue
        offset = _per_channel(o, channels)
        if offset is None:
            continue
        for first, second in ((0, 1), (1, 0)):
            x, s = m.op.inputs[first], m.op.inputs[second]
            if x.dtype != tf.float32 or x.shape.rank != shape.rank or x.shape.as_list() != shape.as_list():
                continue
            scale = _per_channel(s, channels)
            if scale is not None:
                return x, scale, offset
    return None


@tf.autograph.experimental.do_not_convert
def fused_affine_quantize(y, d, q_max, signed=True):
    """``uniform_quantize(y, d, q_max, signed)`` of a per-channel affine map as one op, or None.

    When ``y = x * scale + offset`` in the training step being traced, with
    ``scale`` and ``offset`` one value per channel (the last axis): the
    output pass of a BatchNormalization in training mode, whose batch
    statistics TensorFlow's own ops compute. Returns
    :func:`affine_quantize` of ``x``: the same values bit for bit and the
    same gradients (to ``x``, ``scale``, ``offset``, ``d`` and ``q_max``)
    as the separate ops, which TensorFlow then prunes where nothing else
    reads them. Otherwise (no such pattern, eager mode, ``FUSE_AFFINE``
    off) None.
    """
    if not FUSE_AFFINE:
        return None
    found = _affine(y)
    if found is None:
        return None
    x, scale, offset = found
    q = affine_quantize(x, scale, offset, d, q_max, signed)
    _remember(q, (y, d, q_max, signed))  # a junction after it reads y, as without this op
    return q


@tf.autograph.experimental.do_not_convert
def affine_quantize(x, scale, offset, d, q_max, signed=True):
    """``uniform_quantize(x * scale + offset, d, q_max, signed)`` with the fused kernels.

    ``scale`` and ``offset``: vectors of one value per channel (``x``'s last
    axis), broadcast as in ``x * scale + offset``. One pass forward (the
    product and the sum rounded to float32 as TensorFlow's Mul and AddV2
    round them: the same values bit for bit), one backward: ``gx = gy *
    scale``, ``gscale = sum(gy * x)``, ``goffset = sum(gy)`` per channel
    (summed in double), ``gd`` and ``gq`` as :func:`uniform_quantize`'s,
    with ``gy`` the quantizer's straight-through gradient at ``x * scale +
    offset``. Raises RuntimeError where the kernels are not available
    (see :func:`usable`).
    """
    _require_kernels("tfdq.ops.uniform_quantize of x * scale + offset")
    module = load()
    x = tf.convert_to_tensor(x, tf.float32)
    scale = tf.convert_to_tensor(scale, tf.float32)
    offset = tf.convert_to_tensor(offset, tf.float32)
    d = tf.cast(d, tf.float32)
    q_max = tf.cast(q_max, tf.float32)
    signed = bool(signed)

    @tf.custom_gradient
    def _affine_op(x, scale, offset, d, q_max):
        q = module.tfdq_affine_quantize(x, scale, offset, d, q_max, signed=signed)

        def grad(dy):
            return module.tfdq_affine_quantize_grad(dy, x, scale, offset, d, q_max, signed=signed)

        return q, grad

    return _affine_op(x, scale, offset, d, q_max)


@tf.autograph.experimental.do_not_convert
def affine_add_relu_quantize(x, scale, offset, b, d_a, q_max_a, d, q_max, signed_a=True):
    """:func:`add_relu_quantize` of ``a = x * scale + offset`` (per channel) and ``b``, one op.

    ``Q(relu(Q_a(x * scale + offset) + b))``: a residual branch's
    BatchNorm output pass, its quantizer, the Add, the ReLU and the block
    output's quantizer; one pass forward (read ``x`` and ``b``, write the
    output), one backward (read ``dy``, ``x`` and ``b``; write the gradients
    to ``x`` and ``b``). Values bit for bit those of the separate ops;
    gradients theirs, the per-channel sums ``gscale = sum(ga * x)`` and
    ``goffset = sum(ga)`` in double (``ga`` the gradient at ``a``). Raises
    RuntimeError where the kernels are not available (see :func:`usable`).
    """
    _require_kernels("the separate BatchNorm output pass, quantizers, Add and ReLU")
    module = load()
    x = tf.convert_to_tensor(x, tf.float32)
    scale = tf.convert_to_tensor(scale, tf.float32)
    offset = tf.convert_to_tensor(offset, tf.float32)
    b = tf.convert_to_tensor(b, tf.float32)
    scalars = [tf.cast(v, tf.float32) for v in (d_a, q_max_a, d, q_max)]
    signed_a = bool(signed_a)

    @tf.custom_gradient
    def _junction_op(x, scale, offset, b, d_a, q_max_a, d, q_max):
        q = module.tfdq_affine_add_relu_quantize(
            x, scale, offset, b, d_a, q_max_a, d, q_max, signed_a=signed_a
        )

        def grad(dy):
            return module.tfdq_affine_add_relu_quantize_grad(
                dy, x, scale, offset, b, d_a, q_max_a, d, q_max, signed_a=signed_a
            )

        return q, grad

    return _junction_op(x, scale, offset, b, *scalars)
