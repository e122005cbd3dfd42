"""The direct launcher keeps a compiled kernel per variant and launches it with exactly the
arguments JITFunction.run would pass, and goes back through triton whenever anything
triton specializes on changes. A stand-in kernel records both kinds of launch; on a GPU,
every kernel test runs through the direct launcher from its second launch on."""

import threading
import time

import pytest
import torch

triton = pytest.importorskip("triton")
from mtlfast.kernels import launcher  # noqa: E402


class StandInCompiled:
    def __init__(self, calls: list):
        self.function, self.packed_metadata = object(), object()
        self.run = lambda *args: calls.append(("direct", args))


class StandInKernel:
    """Records ``kernel[grid](*args, **kwargs)`` and returns one compiled kernel per call."""

    arg_names = ["x_ptr", "n", "scale", "flag", "BLOCK", "EVEN"]

    def __init__(self):
        self.calls, self.compiled = [], []

    def __getitem__(self, grid):
        def run(*args, **kwargs):
            self.calls.append(("triton", grid, args, kwargs))
            self.compiled.append(StandInCompiled(self.calls))
            return self.compiled[-1]

        return run


@pytest.fixture
def stand_in(monkeypatch):
    monkeypatch.setattr(launcher, "ENABLED", True)
    monkeypatch.setattr(launcher, "_hooks_installed", lambda: False)
    monkeypatch.setattr(launcher, "_current_device", lambda: 0)
    kernel = StandInKernel()
    launch = launcher.DirectLauncher(kernel)
    launch._current_stream = lambda device: 1000 + device
    return kernel, launch


def _launch(launch, x, n=64, scale=0.5, flag=True, block=32, grid=(3,)):
    kwargs = {"BLOCK": block, "EVEN": n % block == 0, "num_warps": 4}
    launch(grid, (x, n, scale, flag), kwargs, tuple(kwargs.values()))


def test_second_launch_of_a_variant_is_direct_with_the_bound_arguments(stand_in):
    kernel, launch = stand_in
    x = torch.zeros(64)
    _launch(launch, x)
    _launch(launch, x, scale=2.0, flag=False, grid=(5, 2))
    assert [c[0] for c in kernel.calls] == ["triton", "direct"]
    compiled = kernel.compiled[0]
    args = kernel.calls[1][1]
    assert args[:9] == (5, 2, 1, 1000, compiled.function, compiled.packed_metadata, None, None, None)
    assert args[9:] == (x, 64, 2.0, False, 32, True)


@pytest.mark.parametrize(
    "change",
    ["misaligned tensor", "other dtype", "int becomes 1", "int loses 16-divisibility", "int64", "small int",
     "constexpr", "option", "float becomes int", "device"],
)
def test_any_specialization_change_goes_through_triton(stand_in, change, monkeypatch):
    kernel, launch = stand_in
    x = torch.zeros(65)
    _launch(launch, x[:64])
    _launch(launch, x[:64])
    changed = {
        "misaligned tensor": lambda: _launch(launch, x[1:]),
        "other dtype": lambda: _launch(launch, x[:64].double()),
        "int becomes 1": lambda: _launch(launch, x[:64], n=1),
        "int loses 16-divisibility": lambda: _launch(launch, x[:64], n=72),
        "int64": lambda: _launch(launch, x[:64], n=2**33),
        "small int": lambda: _launch(launch, x[:64], n=2),
        "constexpr": lambda: _launch(launch, x[:64], block=64),
        "option": lambda: launch((3,), (x[:64], 64, 0.5, True), {"BLOCK": 32, "EVEN": True, "num_warps": 8}, 8),
        "float becomes int": lambda: _launch(launch, x[:64], scale=2),
        "device": lambda: (monkeypatch.setattr(launcher, "_current_device", lambda: 1), _launch(launch, x[:64])),
    }[change]
    changed()
    changed()
    assert [c[0] for c in kernel.calls] == ["triton", "direct", "triton", "direct"]


def _launch_fixed(launch, x, n=64, block=32, variant=None):
    """As _launch, but ``fixed``: by default under _launch's variant for ``n=64``, ``block=32``."""
    kwargs = {"BLOCK": block, "EVEN": True, "num_warps": 4}
    launch((3,), (x, n, 0.5, True), kwargs, (32, True, 4) if variant is None else variant, fixed=True)


def test_fixed_launches_look_at_alignment_only(stand_in):
    """A fixed variant's launches are direct from the second on, and go back through triton
    (once) only when a tensor's alignment changes; the compiled kernel is shared with launches
    keyed in full."""
    kernel, launch = stand_in
    x = torch.zeros(65)
    _launch(launch, x[:64], block=32)  # keyed in full: compiles
    _launch_fixed(launch, x[:64])
    _launch_fixed(launch, x[:64])
    _launch_fixed(launch, x[1:])
    _launch_fixed(launch, x[1:])
    _launch_fixed(launch, x[1:])
    assert [c[0] for c in kernel.calls] == ["triton", "direct", "direct", "triton", "direct", "direct"]
    assert len(kernel.compiled) == 2
    # the tensor reaches the compiled launcher as its address, the rest as it was passed
    assert kernel.calls[-1][1][9:] == (x[1:].data_ptr(), 64, 0.5, True, 32, True)


def test_fixed_launches_take_their_tensors_first(stand_in):
    kernel, launch = stand_in
    x = torch.zeros(64)
    with pytest.raises(ValueError, match="passes a tensor after a non-tensor"):
        launch((3,), (64, x), {"BLOCK": 32, "num_warps": 4}, "scalar first", fixed=True)
    assert kernel.calls == []


def test_checked_fixed_launches_catch_a_variant_that_does_not_fix_its_arguments(stand_in, monkeypatch):
    kernel, launch = stand_in
    monkeypatch.setattr(launch, "check_fixed", True)
    x = torch.zeros(64)
    _launch_fixed(launch, x)
    _launch_fixed(launch, x)
    with pytest.raises(AssertionError, match="does not fix"):
        _launch_fixed(launch, x, n=72)  # another int specialization under the same variant
    with pytest.raises(AssertionError, match="does not fix"):
        _launch_fixed(launch, x, block=64)  # other keyword arguments under the same variant
    monkeypatch.setattr(launch, "check_fixed", False)
    _launch_fixed(launch, x, n=72)  # unchecked, the variant is trusted
    assert [c[0] for c in kernel.calls] == ["triton", "direct", "direct"]


def test_fixed_keys_start_over_past_their_bound(stand_in, monkeypatch):
    kernel, launch = stand_in
    monkeypatch.setattr(launcher, "FIXED_KEYS_KEPT", 3)
    x = torch.zeros(64)
    for variant in range(5):
        _launch_fixed(launch, x, variant=variant)
        _launch_fixed(launch, x, variant=variant)
    assert len(launch._fixed_tensors) <= 3 and len(launch._fixed) <= 3
    assert [c[0] for c in kernel.calls] == ["triton", "direct"] * 5


def test_launch_hooks_and_the_switch_send_every_launch_through_triton(stand_in, monkeypatch):
    kernel, launch = stand_in
    x = torch.zeros(64)
    monkeypatch.setattr(launcher, "_hooks_installed", lambda: True)
    _launch(launch, x)
    _launch(launch, x)
    monkeypatch.setattr(launcher, "_hooks_installed", lambda: False)
    monkeypatch.setattr(launcher, "ENABLED", False)
    _launch(launch, x)
    assert [c[0] for c in kernel.calls] == ["triton"] * 3


def test_hooks_installed_reads_triton_hook_chains():
    if launcher.knobs is None:
        pytest.skip("triton without knobs: the direct launcher is off")
    assert not launcher._hooks_installed()
    chain = launcher.knobs.runtime.launch_enter_hook

    def hook(metadata):
        return None

    if hasattr(chain, "add"):
        chain.add(hook)
        try:
            assert launcher._hooks_installed()
        finally:
            chain.remove(hook)
    else:
        launcher.knobs.runtime.launch_enter_hook = hook
        try:
            assert launcher._hooks_installed()
        finally:
            launcher.knobs.runtime.launch_enter_hook = chain
    assert not launcher._hooks_installed()


def test_key_is_at_least_as_fine_as_triton_specialization(monkeypatch):
    """Any two arguments the direct launcher's key cannot tell apart, triton's own specialization
    (``native_specialize_impl``, which ``JITFunction.run`` applies to each argument) cannot
    either: a kept kernel is always the one triton would have picked."""
    native = getattr(pytest.importorskip("triton._C.libtriton"), "native_specialize_impl", None)
    if native is None or launcher.knobs is None:
        pytest.skip(f"triton {triton.__version__} launches through JITFunction.run alone (no direct launcher)")
    from triton.backends.compiler import BaseBackend

    monkeypatch.setattr(launcher, "_current_device", lambda: 0)
    launch = launcher.DirectLauncher(StandInKernel())
    x = torch.zeros(80)
    samples = [x, x[1:], x[4:], x[8:], x.double(), x.half()[16:], x.to(torch.int64), torch.zeros(3, dtype=torch.uint8)]
    samples += [0, 1, 2, 3, 15, 16, 17, 31, 32, 48, 768, 1000, -1, -16, -17, 2**31 - 16, 2**31, 2**31 + 1, 2**32,
                -(2**31), -(2**31) - 16, 2**63 - 16, 2**63, 2**64 - 16, 0.0, 0.5, 1.0, True, False]
    for a in samples:
        for b in samples:
            if launch._key(None, (a,)) == launch._key(None, (b,)):
                assert native(BaseBackend, a, False, True, True) == native(BaseBackend, b, False, True, True), (a, b)
    # and within one call: which of several tensors is misaligned changes the key
    assert launch._key(None, (x, x[1:], 16)) != launch._key(None, (x[1:], x, 16))
    assert launch._key(None, (x, x, 16)) != launch._key(None, (x, x[1:], 16))
    assert launch._key(None, (x, x[4:], 16)) == launch._key(None, (x[8:], x, 16))


def test_autotuned_launches_from_threads_take_turns(monkeypatch):
    """Each thread's launch through the small-heads kernel's autotuner returns the config its own
    run picked: an Autotuner keeps its pick on itself, so runs at once would read each other's
    (nn.DataParallel's replicas launch from a thread each)."""
    from mtlfast.kernels import small_heads

    class StandInAutotuner:
        best_config = None

        def __getitem__(self, grid):
            def run(pick):
                self.best_config = pick
                time.sleep(0.01)  # where another thread's run would set its own pick

            return run

    tuner = StandInAutotuner()
    monkeypatch.setattr(small_heads, "_tuned_kernel", lambda backward: tuner)
    picked = {}

    def launch(pick: int) -> None:
        picked[pick] = small_heads.tuned_launch(False, None, (pick,), {})

    threads = [threading.Thread(target=launch, args=(pick,)) for pick in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert picked == {pick: pick for pick in range(8)}
