"""Provider registry: priority, supports fall-through, scoping, threads, env var; opcheck."""

import os
import subprocess
import sys
import textwrap
import threading

import pytest
import torch
from helpers import assert_bitwise_equal, cn, opcheck_cases, randn

from compile_norm.ops import registry
from compile_norm.ops.registry import Provider

OP = "rms_norm"
EPS = 1e-6
EXPECTED_OPS = {
    "rms_norm",
    "fused_add_rms_norm",
    "rms_norm_add_rms_norm",
    "rms_norm_backward",
    "rms_norm_gated",
    *(
        f"{kind}{scheme}"
        for kind in ("quant_", "rms_norm_", "fused_add_rms_norm_", "rms_norm_gated_")
        for scheme in (
            "fp8_static", "fp8_dynamic", "fp8_dynamic_tensor", "fp8_group", "int8_static",
            "int8_dynamic", "int8_dynamic_asym", "mxfp8",
        )
    ),
}


class FakeProviders:
    """Registers test providers that record each call and compute the reference."""

    def __init__(self):
        self.calls = []  # (provider name, thread id)
        self._registered = []
        self._lock = threading.Lock()

    def add(self, name, op=OP, supports=None, rank=100, supported=True, reason=""):
        reference = registry.ops()[op].reference

        def fn(*args, **kwargs):
            with self._lock:
                self.calls.append((name, threading.get_ident()))
            return reference(*args, **kwargs)

        extra = {"supports": supports} if supports is not None else {}
        registry.register_provider(
            op, Provider(name, fn, supported=supported, rank=rank, reason=reason, **extra)
        )
        self._registered.append((op, name))

    def names(self):
        return [name for name, _ in self.calls]

    def cleanup(self):
        for op, name in self._registered:
            registry.unregister_provider(op, name)
        registry.set_priority(None)


@pytest.fixture
def fake():
    """Fake providers on an otherwise bare registry: the real device providers (triton on a
    GPU machine) are set aside for the test and restored after it."""
    real = {
        op: [p for name, p in registry.providers(op).items() if name != "native"]
        for op in registry.ops()
    }
    for op, found in real.items():
        for provider in found:
            registry.unregister_provider(op, provider.name)
    providers = FakeProviders()
    try:
        yield providers
    finally:
        providers.cleanup()
        for op, found in real.items():
            for provider in found:
                registry.register_provider(op, provider)


def _args():
    return randn(3, 96), randn(96), EPS


def _run_and_check(fake, expected_name, *args, **kwargs):
    """Run the op; the provider that ran is the expected one and which_provider agrees."""
    args = args or _args()
    before = len(fake.calls)
    out = cn.rms_norm(*args, **kwargs)
    ran = fake.names()[before:]
    assert ran == ([] if expected_name == "native" else [expected_name])
    assert registry.which_provider(OP, *args, **kwargs) == expected_name
    assert_bitwise_equal(out, registry.ops()[OP].reference(*args, **kwargs))


def test_all_ops_declared():
    assert set(registry.ops()) == EXPECTED_OPS
    for name in EXPECTED_OPS:
        assert hasattr(torch.ops.compile_norm, name)
        assert "native" in registry.providers(name)
        assert registry.chain(name)[-1].name == "native"


def test_rank_orders_providers(fake):
    _run_and_check(fake, "native")
    fake.add("slow", rank=50)
    _run_and_check(fake, "slow")
    fake.add("fast", rank=10)
    _run_and_check(fake, "fast")
    assert [p.name for p in registry.chain(OP)] == ["fast", "slow", "native"]


def test_set_priority(fake):
    fake.add("a", rank=10)
    fake.add("b", rank=20)
    registry.set_priority({OP: ["b"]})
    _run_and_check(fake, "b")
    assert [p.name for p in registry.chain(OP)] == ["b", "a", "native"]
    registry.set_priority(["a"])  # every op
    _run_and_check(fake, "a")
    registry.set_priority({OP: ["native"]})  # forces the reference
    _run_and_check(fake, "native")
    assert [p.name for p in registry.chain(OP)] == ["native"]
    registry.set_priority("rms_norm=b,native;*=a")  # spec string, as in the env var
    assert [p.name for p in registry.chain(OP)] == ["b", "native"]
    with pytest.raises(ValueError, match="names provider 'no_such_provider', which no op has; "
                       "registered providers: a, b, native"):
        registry.set_priority(["no_such_provider", "b"])  # a typo is an error, not ignored
    registry.set_priority(["b"])
    _run_and_check(fake, "b")
    registry.set_priority(None)
    _run_and_check(fake, "a")


def test_priority_for_other_op_does_not_apply(fake):
    fake.add("a", rank=10)
    registry.set_priority({"fused_add_rms_norm": ["native"]})
    _run_and_check(fake, "a")


def test_supports_rejection_falls_through(fake):
    # "a" only reproduces weighted calls without a variance window; "b" only bfloat16.
    fake.add("a", rank=10, supports=lambda x, w, eps, off, vs: w is not None and vs is None)
    fake.add("b", rank=20, supports=lambda x, w, eps, off, vs: x.dtype == torch.bfloat16)
    x, w = randn(3, 96), randn(96)
    _run_and_check(fake, "a", x, w, EPS)
    _run_and_check(fake, "a", x, w, EPS, weight_offset=1.0)
    _run_and_check(fake, "native", x, None, EPS)
    _run_and_check(fake, "native", x, w, EPS, variance_size=32)
    _run_and_check(fake, "b", x.bfloat16(), None, EPS)
    _run_and_check(fake, "b", x.bfloat16(), w.bfloat16(), EPS, variance_size=32)


def test_supports_sees_normalized_arguments(fake):
    # Providers and supports get every argument positionally, defaults filled in, however
    # the caller wrote the call.
    seen = []

    def supports(*args, **kwargs):
        seen.append((len(args), sorted(kwargs)))
        return True

    fake.add("a", supports=supports)
    x, w = randn(2, 96), randn(96)
    cn.rms_norm(x, w, EPS)
    cn.rms_norm(x, weight=w, eps=EPS, variance_size=8)
    assert registry.which_provider(OP, x, w, eps=EPS) == "a"
    assert seen == [(5, [])] * 3


def test_fused_op_provider_choice(fake):
    # A kernel that only does 128-wide groups with row-major scales, told apart by position:
    # (x, weight, eps, group_size, column_major_scales, use_ue8m0, <scale arithmetic>,
    # weight_offset, variance_size).
    op = "rms_norm_fp8_group"
    fake.add("k", op=op, supports=lambda x, w, eps, g, col, ue8m0, *rest: g == 128 and not col)
    x, w = randn(2, 256), randn(256)
    for kwargs, name in (
        ({}, "k"),
        ({"group_size": 64}, "native"),
        ({"column_major_scales": True, "weight_offset": 1.0}, "native"),
        ({"use_ue8m0": True, "variance_size": 100}, "k"),
    ):
        before = len(fake.calls)
        out = torch.ops.compile_norm.rms_norm_fp8_group(x, w, EPS, **kwargs)
        assert fake.names()[before:] == ([] if name == "native" else [name])
        assert registry.which_provider(op, x, w, EPS, **kwargs) == name
        assert_bitwise_equal(out, registry.ops()[op].reference(x, w, EPS, **kwargs))


def test_scoped_priority_nests_and_restores(fake):
    fake.add("a", rank=10)
    fake.add("b", rank=20)
    registry.set_priority({OP: ["b"]})
    with registry.providers_priority(["a"]):  # scoped beats process-wide
        _run_and_check(fake, "a")
        with registry.providers_priority({OP: ["native"]}):
            _run_and_check(fake, "native")
            with registry.providers_priority({"fused_add_rms_norm": ["native"]}):
                _run_and_check(fake, "native")  # inherits the enclosing scope for rms_norm
        _run_and_check(fake, "a")
    _run_and_check(fake, "b")
    with pytest.raises(KeyError):
        with registry.providers_priority({OP: ["native"]}):
            raise KeyError("boom")
    _run_and_check(fake, "b")  # restored after an exception too


def test_env_var_in_subprocess():
    script = textwrap.dedent(
        """
        import torch, compile_norm
        from compile_norm.ops import registry
        from compile_norm.ops.registry import Provider
        for op in ("rms_norm", "fused_add_rms_norm"):
            ref = registry.ops()[op].reference
            for name, rank in (("fa", 10), ("fb", 20)):
                registry.register_provider(op, Provider(name, ref, rank=rank))
        x, w = torch.randn(2, 64), torch.randn(64)
        print(registry.which_provider("rms_norm", x, w, 1e-6),
              registry.which_provider("fused_add_rms_norm", x, x, w, 1e-6))
        with registry.providers_priority(["fa"]):
            print(registry.which_provider("rms_norm", x, w, 1e-6))
        registry.set_priority(["fa"])  # the API overrides the environment
        print(registry.which_provider("fused_add_rms_norm", x, x, w, 1e-6))
        """
    )
    results = {}
    for spec in ("fb", "rms_norm=native;*=fb,fa"):  # each a fresh interpreter (~4 s)
        env = {**os.environ, "COMPILE_NORM_PROVIDERS": spec}
        repo_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        env["PYTHONPATH"] = os.pathsep.join([repo_root, env.get("PYTHONPATH", "")])
        out = subprocess.run(
            [sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120
        )
        assert out.returncode == 0, out.stderr
        results[spec] = out.stdout.split()
    # Without the variable "fa" (lower rank) would win everywhere (test_rank_orders_providers).
    assert results["fb"] == ["fb", "fb", "fa", "fa"]
    assert results["rms_norm=native;*=fb,fa"] == ["native", "fb", "fa", "fa"]


def test_unknown_op_names():
    for bad in (
        lambda: registry.register_provider("rms_nrom", Provider("x", print)),
        lambda: registry.set_priority({"rms_nrom": ["native"]}),
        lambda: registry.providers("rms_nrom"),
        lambda: registry.unsupported_reasons("rms_nrom"),
        lambda: registry.which_provider("rms_nrom", randn(2, 8), None, EPS),
        lambda: registry.providers_priority({"rms_nrom": ["native"]}).__enter__(),
    ):
        with pytest.raises(ValueError, match="unknown op 'rms_nrom'"):
            bad()
    assert registry._SCOPED_PRIORITY.get() is None  # the failed scope left nothing behind


def test_native_is_fixed():
    native = registry.providers(OP)["native"]
    with pytest.raises(ValueError, match="native"):
        registry.register_provider(OP, Provider("native", lambda *a: None))
    with pytest.raises(ValueError, match="native"):
        registry.unregister_provider(OP, "native")
    assert registry.providers(OP)["native"] is native
    assert native.fn is registry.ops()[OP].reference


def test_unsupported_provider_is_skipped_with_reason(fake):
    fake.add("gpu_only", rank=1, supported=False, reason="needs a CUDA device")
    fake.add("cpu_ok", rank=50)
    # Other real providers (e.g. triton without a GPU) may be listed too.
    assert registry.unsupported_reasons(OP)["gpu_only"] == "needs a CUDA device"
    assert "gpu_only" in registry.providers(OP)
    _run_and_check(fake, "cpu_ok")
    registry.set_priority({OP: ["gpu_only"]})
    _run_and_check(fake, "cpu_ok")
    with registry.providers_priority(["gpu_only", "native"]):
        _run_and_check(fake, "native")
    assert "gpu_only" not in fake.names()
    assert "gpu_only" not in registry.unsupported_reasons("fused_add_rms_norm")


def test_priority_state_changes_with_providers_and_priorities(fake):
    s0 = registry.priority_state()
    fake.add("a", rank=10)
    s1 = registry.priority_state()
    registry.set_priority({OP: ["native"]})
    s2 = registry.priority_state()
    with registry.providers_priority(["a"]):
        s3 = registry.priority_state()
    assert s1 != s0 and s2 != s1 and s3 != s2
    # a state, not a history: equal chains are equal states ("native" first chooses what
    # the registry without "a" chose; scoped "a" first is the chain "a" had by its rank)
    assert s2 == s0 and s3 == s1
    assert registry.priority_state() == s2


def test_scoped_priority_does_not_leak_across_threads(fake):
    fake.add("a", rank=10)
    fake.add("b", rank=20)
    entered, checked = threading.Barrier(2), threading.Barrier(2)
    seen, errors = {}, []

    def scoped():
        try:
            with registry.providers_priority({OP: ["b"]}):
                entered.wait(timeout=30)  # the other thread runs while this scope is open
                checked.wait(timeout=30)
                seen["scoped"] = registry.which_provider(OP, *_args())
                cn.rms_norm(*_args())
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    def plain():
        try:
            entered.wait(timeout=30)
            seen["plain"] = registry.which_provider(OP, *_args())
            cn.rms_norm(*_args())
            checked.wait(timeout=30)
        except Exception as e:  # pragma: no cover
            errors.append(e)

    threads = [threading.Thread(target=scoped), threading.Thread(target=plain)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors
    assert seen == {"scoped": "b", "plain": "a"}
    by_thread = dict((ident, name) for name, ident in fake.calls)
    assert sorted(by_thread.values()) == ["a", "b"]
    assert {threads[0].ident: "b", threads[1].ident: "a"} == by_thread
    assert registry.which_provider(OP, *_args()) == "a"  # nothing leaked into this thread


def test_concurrent_dispatch_is_correct(fake):
    fake.add("a", rank=10, supports=lambda x, w, eps, off, vs: w is not None)
    n_threads, n_iters = 8, 25
    start = threading.Barrier(n_threads)
    failures = []
    inputs = [(randn(4, 96, dtype=torch.bfloat16), randn(96, dtype=torch.bfloat16)) for _ in range(n_threads)]

    def work(i):
        x, w = inputs[i]
        want_w = registry.ops()[OP].reference(x, w, EPS)
        want_none = registry.ops()[OP].reference(x, None, EPS)
        start.wait(timeout=30)
        for k in range(n_iters):
            scope = {OP: ["native"]} if i % 2 else {}
            with registry.providers_priority(scope):
                got = cn.rms_norm(x, w if k % 2 else None, EPS)
            want = want_w if k % 2 else want_none
            if not torch.equal(got, want):
                failures.append((i, k))

    threads = [threading.Thread(target=work, args=(i,)) for i in range(n_threads)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not failures
    # Only even threads (no scope) with a weight used "a": n_threads / 2 * n_iters / 2 calls.
    assert fake.names() == ["a"] * (n_threads // 2 * (n_iters // 2))


def test_dispatch_function_matches_op(fake):
    fake.add("a", rank=10)
    x, w = randn(2, 96), randn(96)
    assert_bitwise_equal(registry.dispatch(OP, x, w, EPS, 1.0, None), cn.rms_norm(x, w, EPS, weight_offset=1.0))
    assert fake.names() == ["a", "a"]


# --- opcheck: every declared op -------------------------------------------------------

OPCHECK = [
    pytest.param(name, case_id, id=f"{name}-{case_id}")
    for name in sorted(EXPECTED_OPS)
    for case_id, _, _ in opcheck_cases(name)
]


@pytest.mark.parametrize("name,case_id", OPCHECK)
def test_opcheck(name, case_id):
    args, kwargs = next((a, k) for c, a, k in opcheck_cases(name) if c == case_id)
    torch.library.opcheck(getattr(torch.ops.compile_norm, name).default, args, kwargs)


def test_opcheck_covers_every_registered_op():
    assert {p.values[0] for p in OPCHECK} == set(registry.ops())


def test_typo_in_provider_names_is_a_clear_error():
    from compile_norm.options import parse_options

    with pytest.raises(ValueError, match=r"^compile_norm: option 'providers' names provider 'tritn'"):
        parse_options({"providers": ["tritn"]})
    with pytest.raises(ValueError, match="names provider 'tritn'"):
        with registry.providers_priority({"rms_norm": ["tritn", "native"]}):
            pass
    with pytest.raises(ValueError, match="unknown op 'rms_nrom'"):
        parse_options({"providers": {"rms_nrom": ["native"]}})
    parse_options({"providers": "rms_norm=native;*=triton,native"})  # known names: fine


def test_typo_in_the_environment_variable_is_said_at_import():
    env = dict(os.environ, COMPILE_NORM_PROVIDERS="rms_norm=tritn")
    p = subprocess.run([sys.executable, "-W", "always", "-c", "import compile_norm"], env=env,
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert ("UserWarning: compile_norm: the environment variable COMPILE_NORM_PROVIDERS names "
            "provider 'tritn', which no op has; registered providers: native") in p.stderr
