"""kernels.bench: the byte models and a dry run of the whole script on CPU (interpreter, tiny sizes)."""
from kernels import bench

TARGET = dict(T=16384, m=32, N=2**20, DP=192, DV=192, c=2, elt=2)


def test_fused_design_moves_at_least_the_floor():
    for backward in (False, True):
        floor = bench.lookup_bytes(**TARGET, backward=backward)
        for algo in ("sorted", "atomic"):
            assert bench.triton_bytes(**TARGET, backward=backward, algo=algo) >= floor
    assert bench.triton_bytes(**TARGET, backward=False, algo="atomic") == bench.lookup_bytes(**TARGET, backward=False)


def test_atomic_table_gradients_move_the_fp32_buffers():
    sorted_, atomic = (bench.triton_bytes(**TARGET, backward=True, algo=a) for a in ("sorted", "atomic"))
    fp32_buffers = 2 * TARGET["N"] * (TARGET["DP"] + TARGET["DV"]) * 4  # zero-fill + read for the cast
    assert atomic - sorted_ > fp32_buffers  # plus the read-modify-write of every pair's row


def test_dry_run_exercises_every_row(capsys):
    report = bench.main(["--dry-run"])
    out = capsys.readouterr().out
    assert "timings need a GPU" in out
    for impl in ("triton (sorted)", "triton (atomic)", "torch", "embedding_bag", "scoring GEMMs alone",
                 "GEMMs + torch top-m", "GEMMs + triton top-m"):
        assert f"| {impl} |" in report, impl
    assert "max |kernel - reference|" in out
