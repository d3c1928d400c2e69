"""Options of the pytest-benchmark view (`pytest bench ...`)."""


def pytest_addoption(parser):
    group = parser.getgroup("fusedres bench")
    group.addoption(
        "--bench-set",
        choices=("smoke", "quick", "full"),
        default=None,
        help="fusedres.bench case set (default: quick on CUDA, smoke on CPU, where quick takes minutes)",
    )
    group.addoption("--bench-rounds", type=int, default=10, help="timed rounds per benchmark")
