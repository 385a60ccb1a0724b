"""The Triton side both front doors share: kernels by name, a launch's constexprs and signature as
Triton wants them, and ahead-of-time compilation (the JAX door and tools/compile_check.py).

Compiled kernels go through ``triton.compile``, whose on-disk cache (``TRITON_CACHE_DIR``, by
default ``~/.triton/cache``) keeps them across processes: a second process start loads them.
"""

from __future__ import annotations

import functools
import inspect

# (lowest, first unsupported) Triton release: the kernel ABI jaxlib's launcher and these kernels
# were tested with (3.6.0 on the GPU; see the README's support table).
SUPPORTED_TRITON = ((3, 5), (3, 7))

# dtype names (validate.dtype_name) -> Triton pointer element types
TRITON_TYPES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16", "float8_e4m3fn": "fp8e4nv",
                "int32": "i32", "int64": "i64"}


def version_tuple(raw: str) -> tuple[int, ...]:
    parts = []
    for p in raw.split("+")[0].split("."):
        digits = "".join(ch for ch in p if ch.isdigit())
        if not digits:
            break
        parts.append(int(digits))
    return tuple(parts)


def version_problem(dist: str, lo: tuple[int, ...], hi: tuple[int, ...]) -> str | None:
    """Why the installed `dist` is not in [lo, hi) (None when it is)."""
    from importlib import metadata

    want = f">={'.'.join(map(str, lo))},<{'.'.join(map(str, hi))}"
    try:
        v = version_tuple(metadata.version(dist))
    except metadata.PackageNotFoundError:
        return f"{dist} is not installed (need {want})"
    if not lo <= v < hi:
        return f"{dist} {'.'.join(map(str, v))} is outside the supported range {want}"
    return None


@functools.lru_cache(maxsize=None)
def check_triton() -> None:
    """Raise a RuntimeError naming the installed Triton when it is outside SUPPORTED_TRITON."""
    problem = version_problem("triton", *SUPPORTED_TRITON)
    if problem:
        raise RuntimeError(f"ragged_paged_attention's Triton kernels cannot run: {problem}")


def kernel(name: str):
    from . import kernels

    return getattr(kernels, name)


def constexprs(consts) -> dict:
    """A launch's constexprs ((name, value) pairs) for Triton: the compute dtype name becomes a Triton dtype."""
    import triton.language as tl

    out = dict(consts)
    if "COMPUTE" in out:
        out["COMPUTE"] = getattr(tl, out["COMPUTE"])
    return out


def signature(name: str, consts, pointer_dtypes: tuple[str, ...]) -> dict[str, str]:
    """{parameter: Triton type} of kernel `name`: its first parameters are the pointers (typed by
    their arrays' dtype names), the other non-constexpr ones run-time int32 sizes. A tl.constexpr
    parameter the launch leaves out takes its default (full_constexprs): it must not become a
    run-time parameter, which the launch would not pass (jaxlib then launches with the wrong
    arguments: CUDA_ERROR_INVALID_VALUE or a host crash)."""
    const_names = {k for k, _ in consts} | set(constexpr_params(name))
    sig = {}
    for i, arg in enumerate(kernel(name).arg_names):
        if arg in const_names:
            sig[arg] = "constexpr"
        elif i < len(pointer_dtypes):
            sig[arg] = "*" + TRITON_TYPES[pointer_dtypes[i]]
        else:
            sig[arg] = "i32"
    return sig


def constexpr_params(name: str) -> dict:
    """{name: default (inspect.Parameter.empty: none)} of kernel `name`'s tl.constexpr parameters
    (read from its Python function: the same compiled or under TRITON_INTERPRET)."""
    import triton.language as tl

    params = inspect.signature(kernel(name).fn).parameters.values()
    return {p.name: p.default for p in params
            if p.annotation is tl.constexpr or (isinstance(p.annotation, str) and p.annotation.endswith("constexpr"))}


def full_constexprs(name: str, consts) -> dict:
    """constexprs(consts) plus the defaults of kernel `name`'s tl.constexpr parameters not given."""
    given = dict(consts)
    out = {}
    for k, default in constexpr_params(name).items():
        if k not in given:
            if default is inspect.Parameter.empty:
                raise ValueError(f"{name}: constexpr {k} has no default and the launch does not set it")
            out[k] = default
    out.update(constexprs(consts))
    return out


def assumes_aligned(dtype_name: str) -> bool:
    """Whether a pointer of this dtype is compiled as 16-byte aligned (vectorised loads). Float data
    (queries, cache, outputs, scratch) comes from torch or XLA allocations, which are; int32 index
    arrays may be slices of a larger array inside a jitted step (seen: a server step's metadata),
    so their kernels make no such assumption. jaxlib checks the claim at every launch."""
    return not dtype_name.startswith("int")


def compile_key(launch, pointer_dtypes: tuple[str, ...], arch: int) -> tuple:
    """What a compiled kernel depends on: never the grid or the run-time sizes."""
    assert len(pointer_dtypes) == len(launch.inputs) + len(launch.outputs), (launch.kernel, pointer_dtypes)
    return (launch.kernel, tuple(pointer_dtypes), launch.constexprs, launch.num_warps, launch.num_stages, arch)


@functools.lru_cache(maxsize=None)
def _compile(key: tuple):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    name, pointer_dtypes, consts, num_warps, num_stages, arch = key
    fn = kernel(name)
    if not isinstance(fn, triton.runtime.JITFunction):
        raise RuntimeError(f"{name} is a {type(fn).__name__}, not a JITFunction: TRITON_INTERPRET was set when "
                           "ragged_paged_attention.triton.kernels was imported, so it cannot be compiled")
    sig = signature(name, consts, pointer_dtypes)
    attrs = {(i,): [["tt.divisibility", 16]] for i, dt in enumerate(pointer_dtypes) if assumes_aligned(dt)}
    src = ASTSource(fn=fn, signature=sig, constexprs=full_constexprs(name, consts), attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", arch, 32),
                          options={"num_warps": num_warps, "num_stages": num_stages})


def compile_launch(launch, pointer_dtypes: tuple[str, ...], arch: int = 90):
    """triton.compile of one launch for sm_<arch> (no GPU needed); cached in process and on disk.
    Refuses a launch whose arguments (pointers, then run-time sizes) are not exactly the compiled
    kernel's run-time parameters: launching it would read the wrong arguments."""
    check_arguments(launch, pointer_dtypes)
    return _compile(compile_key(launch, pointer_dtypes, arch))


def check_arguments(launch, pointer_dtypes: tuple[str, ...]) -> None:
    """ValueError unless the launch's pointers and sizes are the kernel's run-time parameters."""
    sig = signature(launch.kernel, launch.constexprs, pointer_dtypes)
    runtime = [k for k, v in sig.items() if v != "constexpr"]
    if len(runtime) != len(pointer_dtypes) + len(launch.scalars):
        raise ValueError(f"{launch.kernel}: the launch passes {len(pointer_dtypes)} pointers and "
                         f"{len(launch.scalars)} sizes, the kernel takes {len(runtime)} run-time parameters: {runtime}")


def compiled_count() -> int:
    """Kernels compiled (or loaded from Triton's disk cache) by this process: one per compile key."""
    return _compile.cache_info().currsize
