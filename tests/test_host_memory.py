"""ops.retain_freed_memory: a jitted CPU computation's temporary buffers stop being page-faulted in on every call."""
import subprocess
import sys
import textwrap

import pytest

SCRIPT = textwrap.dedent("""
    import resource, sys
    if sys.argv[1] == "retain":
        from attn_flax import ops
        assert ops.retain_freed_memory()
    import jax, jax.numpy as jnp
    f = jax.jit(lambda x: jnp.sum(jnp.tanh(x[:, None, :] * x[None, :, :]) @ x))  # a 256 MB temporary
    x = jnp.ones((400, 400))
    for _ in range(4):  # jax 0.12 still maps fresh memory in the third call
        f(x).block_until_ready()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    f(x).block_until_ready()
    print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
""")


def _page_faults_per_call(mode: str) -> int:
    out = subprocess.run([sys.executable, "-c", SCRIPT, mode], capture_output=True, text=True, check=True,
                         env={"PATH": "", "JAX_PLATFORMS": "cpu"})
    return int(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_retained_memory_removes_per_call_page_faults():
    assert _page_faults_per_call("default") > 30_000, "the baseline should fault the 256 MB temporary in"
    assert _page_faults_per_call("retain") < 3_000


TRIM_SCRIPT = textwrap.dedent("""
    import ctypes, ctypes.util, resource
    from attn_flax import ops
    assert ops.retain_freed_memory()
    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    libc.malloc.restype = ctypes.c_void_p
    size = 2_300_000_000  # a free heap top above 2**31 - 1 bytes, the largest trim threshold mallopt's int can say
    def touch():
        p = libc.malloc(ctypes.c_size_t(size))
        ctypes.memset(p, 1, size)
        libc.free(ctypes.c_void_p(p))
    touch()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    touch()
    print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
""")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_heap_is_not_trimmed_above_two_gib():
    out = subprocess.run([sys.executable, "-c", TRIM_SCRIPT], capture_output=True, text=True, check=True,
                         env={"PATH": ""})
    assert int(out.stdout.strip().splitlines()[-1]) < 3_000, "a 2.3 GB block freed and taken again faults anew"
