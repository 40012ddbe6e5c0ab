"""Bad input is refused before any work, with an error naming the argument and the expected shape.

Device mismatches use the 'meta' device, so they are tested without a GPU.
"""
import pytest
import torch

from umv2_ref.layers import (
    PEER,
    PKM,
    PKMConfig,
    TuckerConfig,
    UltraMem,
    UltraMemConfig,
    UltraMemV2,
    UltraMemV2Config,
    ValuePool,
    ring_layout,
)
from umv2_ref.metrics import UsageTracker, kl_to_uniform, slot_counts
from umv2_ref.retrieval import dense_topk, product_key_topk, rank1_factors, tucker_topk
from umv2_ref.values import expanded_lookup, peer_values, weighted_sum

R, C = torch.randn(4, 6), torch.randn(4, 6)  # axis scores [T, n]
SR, SC, CORES = torch.randn(4, 6, 2), torch.randn(4, 6, 2), torch.rand(2, 2, 2)  # [T, n, r], [c, r, r]
TABLE, IDX, W = torch.randn(10, 8), torch.randint(0, 10, (3, 4)), torch.randn(3, 4)  # [N, D], [T, m], [T, m]
PRE, XPRE = torch.randn(10, 5), torch.randn(3, 5)  # [N, D_p], [T, D_p]
META = torch.randn(4, 6, device="meta")

CASES = {
    # product keys
    "pkm scalar": (lambda: product_key_topk(torch.tensor(1.0), torch.tensor(1.0), 1), ValueError,
                   r"s_row.*\[\.\.\., n\]"),
    "pkm shapes differ": (lambda: product_key_topk(R, torch.randn(4, 7), 2), ValueError,
                          r"s_row and s_col.*same shape"),
    "pkm k > n": (lambda: product_key_topk(R, C, 7), ValueError, r"k must be <= n.*6"),
    "pkm k = 0": (lambda: product_key_topk(R, C, 0), ValueError, r"k must be a positive int"),
    "pkm int scores": (lambda: product_key_topk(R.long(), C.long(), 2), TypeError, r"s_row.*floating"),
    "pkm dtype": (lambda: product_key_topk(R, C.double(), 2), ValueError, r"s_row, s_col.*dtype"),
    "pkm device": (lambda: product_key_topk(R, META, 2), ValueError, r"s_row, s_col.*device"),
    "pkm not a tensor": (lambda: product_key_topk([1.0], C, 1), TypeError, r"s_row must be a torch.Tensor"),
    "dense k > n^2": (lambda: dense_topk(R, C, 37), ValueError, r"k must be <= n\^2 = 36"),
    # TDQKR
    "tucker 1-d scores": (lambda: tucker_topk(R[0], C[0], CORES, 2), ValueError, r"s_row.*\[\.\.\., n, r\]"),
    "tucker cores rank": (lambda: tucker_topk(SR, SC, CORES[0], 2), ValueError, r"cores.*\[c, r, r\]"),
    "tucker cores r": (lambda: tucker_topk(SR, SC, torch.rand(2, 3, 3), 2), ValueError, r"cores.*r=2"),
    "tucker m > n^2": (lambda: tucker_topk(SR, SC, CORES, 37, exact=True), ValueError, r"m must be <= n\^2 = 36"),
    "tucker k > n": (lambda: tucker_topk(SR, SC, CORES, 4, k=7), ValueError, r"k .*k <= n=6"),
    "tucker k*k < m": (lambda: tucker_topk(SR, SC, CORES, 10, k=3), ValueError, r"k\*k >= m=10"),
    "tucker cores dtype": (lambda: tucker_topk(SR, SC, CORES.double(), 2), ValueError, r"s_row, cores.*dtype"),
    "tucker cores device": (lambda: tucker_topk(SR, SC, CORES.to("meta"), 2), ValueError, r"s_row, cores.*device"),
    "tucker zero cores": (lambda: tucker_topk(SR, SC, torch.rand(0, 2, 2), 4), ValueError, r"c >= 1 and r >= 1"),
    "tucker zero rank": (lambda: tucker_topk(SR[..., :0], SC[..., :0], torch.rand(2, 0, 0), 4), ValueError,
                         r"c >= 1 and r >= 1"),
    "tucker nan s_row": (lambda: tucker_topk(SR.clone().index_fill_(1, torch.tensor([2]), float("nan")), SC, CORES, 4),
                         ValueError, r"s_row must be finite; got 8 NaN or infinite entries of 48"),
    "tucker inf s_col": (lambda: tucker_topk(SR, SC.clone().fill_(-float("inf")), CORES, 4, exact=True), ValueError,
                         r"s_col must be finite"),
    "tucker nan cores": (lambda: tucker_topk(SR, SC, CORES.clone().fill_(float("nan")), 4), ValueError,
                         r"cores must be finite"),
    "tucker inf cores": (lambda: tucker_topk(SR, SC, CORES.clone().fill_(float("inf")), 4), ValueError,
                         r"cores must be finite"),
    "tucker rank1 shape": (lambda: tucker_topk(SR, SC, CORES, 4, rank1=(torch.rand(3), torch.rand(2))), ValueError,
                           r"rank1\[0\] must have shape \[r\] = \[2\], got \(3,\)"),
    "tucker rank1 not a pair": (lambda: tucker_topk(SR, SC, CORES, 4, rank1=torch.rand(2)), ValueError,
                                r"rank1 must be a pair \(u, v\)"),
    "tucker rank1 nan": (lambda: tucker_topk(SR, SC, CORES, 4, rank1=(torch.rand(2), torch.full((2,), float("nan")))),
                         ValueError, r"rank1\[1\] must be finite"),
    "tucker rank1 int": (lambda: tucker_topk(SR, SC, CORES, 4, rank1=(torch.ones(2, dtype=torch.long),) * 2),
                         TypeError, r"rank1\[0\] must be a floating-point tensor"),
    "tucker quadrants": (lambda: tucker_topk(SR, SC, CORES, 4, quadrants=4), ValueError, r"quadrants must be 1 or 2"),
    "rank1 nan cores": (lambda: rank1_factors(CORES.clone().fill_(float("nan"))), ValueError, r"cores must be finite"),
    "rank1 zero cores": (lambda: rank1_factors(torch.rand(0, 2, 2)), ValueError, r"c >= 1 and r >= 1"),
    # value paths
    "lookup table rank": (lambda: weighted_sum(TABLE[0], IDX, W), ValueError, r"table.*\[N, D\]"),
    "lookup weights shape": (lambda: weighted_sum(TABLE, IDX, W[:, :3]), ValueError,
                             r"weights.*\[\.\.\., m\] or \[\.\.\., m, c\]"),
    "lookup index range": (lambda: weighted_sum(TABLE, IDX + 10, W), ValueError, r"indices must lie in \[0, 10\)"),
    "lookup negative index": (lambda: weighted_sum(TABLE, IDX - 20, W), ValueError, r"indices must lie in \[0, 10\)"),
    "lookup float indices": (lambda: weighted_sum(TABLE, IDX.float(), W), TypeError, r"indices.*int32 or int64"),
    "lookup dtype": (lambda: weighted_sum(TABLE, IDX, W.double()), ValueError, r"table, weights.*dtype"),
    "lookup device": (lambda: weighted_sum(TABLE, IDX, W.to("meta")), ValueError, r"table, indices, weights.*device"),
    "lookup D % c": (lambda: weighted_sum(TABLE, IDX, torch.randn(3, 4, 3)), ValueError, r"D=8.*cores c=3"),
    "lookup zero cores": (lambda: weighted_sum(TABLE, IDX, torch.randn(3, 4, 0)), ValueError,
                          r"weights \[\.\.\., m, c\] must have c >= 1 cores; got shape \(3, 4, 0\)"),
    "peer zero cores": (lambda: peer_values(XPRE, PRE, TABLE, IDX, torch.randn(3, 4, 0)), ValueError, r"c >= 1 cores"),
    "peer x_pre shape": (lambda: peer_values(XPRE[:, :4], PRE, TABLE, IDX, W), ValueError, r"x_pre.*\[\.\.\., D_p\]"),
    "peer pre rows": (lambda: peer_values(XPRE, PRE[:9], TABLE, IDX, W), ValueError, r"pre_table and table.*rows N"),
    "peer activation": (lambda: peer_values(XPRE, PRE, TABLE, IDX, W, "tanh"), ValueError, r"activation must be"),
    "peer dtype": (lambda: peer_values(XPRE.double(), PRE, TABLE, IDX, W), ValueError,
                   r"x_pre, pre_table, table.*dtype"),
    "ive shuffle": (lambda: expanded_lookup(TABLE, IDX, W, torch.randperm(30), 2), ValueError,
                    r"shuffle.*\[blocks \* N\] = \[20\]"),
    "ive virtual range": (lambda: expanded_lookup(TABLE, IDX + 20, W, torch.randperm(20), 2), ValueError,
                          r"virtual must lie in \[0, 20\)"),
    # metrics
    "counts index range": (lambda: slot_counts(IDX, 5), ValueError, r"indices must lie in \[0, 5\)"),
    "counts weights shape": (lambda: slot_counts(IDX, 10, W[:, :2]), ValueError, r"weights.*\[\.\.\., S\]"),
    "kl empty": (lambda: kl_to_uniform(torch.zeros(4)), ValueError, r"positive sum"),
    "tracker empty": (lambda: UsageTracker(4).summary(), ValueError, r"at least one update"),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_bad_input_is_refused_with_a_named_error(name):
    fn, exc, pattern = CASES[name]
    with pytest.raises(exc, match=pattern):
        fn()


CONFIG_CASES = {
    "pkm d_key odd": (lambda: PKMConfig(d_model=8, d_key=7), r"d_key must be even"),
    "pkm topk > n_keys": (lambda: PKMConfig(d_model=8, n_keys=4, topk=5), r"topk must be <= n_keys=4"),
    "pkm zero heads": (lambda: PKMConfig(d_model=8, heads=0), r"heads must be a positive int"),
    "pkm batch key norm": (lambda: PKMConfig(d_model=8, key_norm="batch"), r"key_norm must be one of \(None, 'layer', 'rms'\) \(keys are not a batch\), got 'batch'"),
    "tucker norm": (lambda: TuckerConfig(d_model=8, norm="batch"), r"norm must be 'layer' or 'rms'"),
    "tucker prefilter k > n": (lambda: TuckerConfig(d_model=8, n_keys=4, topm=4, prefilter_k=5), r"prefilter_k=5"),
    "tucker topm > k^2": (lambda: TuckerConfig(d_model=8, n_keys=4, topm=9, prefilter_k=2), r"k\*k >= topm=9"),
    "v1 expand": (lambda: UltraMemConfig(d_model=8, n_keys=5, topm=4, expand=4), r"n_keys\^2=25.*expand=4"),
    "v1 d_value % cores": (lambda: UltraMemConfig(d_model=8, d_value=9), r"d_value=9.*cores=2"),
    "v2 d_value % cores": (lambda: UltraMemV2Config(d_model=8, d_value=9), r"d_value=9.*cores=2"),
    "v2 key_expand": (lambda: UltraMemV2Config(d_model=8, n_keys=9, topm=4, key_expand=2), r"n_keys=9.*key_expand=2"),
    "v2 d_pre": (lambda: UltraMemV2Config(d_model=8, d_pre=0), r"d_pre must be a positive int"),
    "ring share": (lambda: ring_layout(4, 8, 1.5), r"share_ratio must be in \(0, 1\]"),
    "pool width": (lambda: UltraMemV2(UltraMemV2Config(d_model=8), pool=ValuePool(4096, 16, 32)), r"pool widths"),
    "pool rows": (lambda: UltraMemV2(UltraMemV2Config(d_model=8), pool=ValuePool(100, 32, 32)), r"window 1024 exceeds"),
    "pkm backend": (lambda: PKMConfig(d_model=8, backend="cuda"), r"PKMConfig.backend must be one of \[.*'auto'"),
    "tucker backend": (lambda: UltraMemV2Config(d_model=8, backend="cuda"), r"UltraMemV2Config.backend must be one of"),
    "pkm query norm": (lambda: PKMConfig(d_model=8, query_norm="group"), r"PKMConfig.query_norm must be one of"),
    "pkm key norm": (lambda: PKMConfig(d_model=8, key_norm="group"), r"PKMConfig.key_norm must be one of"),
    "pkm d_value": (lambda: PKMConfig(d_model=8, d_value=0), r"PKMConfig.d_value must be a positive int"),
    "peer d_value ignored": (lambda: PEER(PKMConfig(d_model=16, n_keys=4, topk=2, d_value=8)),
                             r"PEER needs PKMConfig.d_value == d_model.*d_value=8, d_model=16"),
    "peer activation": (lambda: PEER(PKMConfig(d_model=8, n_keys=4, topk=2), activation="tanh"),
                        r"activation must be None or one of"),
    "v2 activation": (lambda: UltraMemV2Config(d_model=8, activation="tanh"),
                      r"UltraMemV2Config.activation must be None or one of"),
    "nan norm gain": (lambda: TuckerConfig(d_model=8, norm_gain=float("nan")),
                      r"TuckerConfig.norm_gain must be a finite number > 0, got nan"),
    "zero norm gain": (lambda: UltraMemConfig(d_model=8, norm_gain=0.0), r"UltraMemConfig.norm_gain must be .* > 0"),
    "negative value std": (lambda: UltraMemV2Config(d_model=8, value_std=-0.02), r"value_std must be a finite number > 0"),
    "nan value std": (lambda: UltraMemV2Config(d_model=8, value_std=float("nan")), r"value_std must be a finite"),
    "negative penalty": (lambda: TuckerConfig(d_model=8, tucker_penalty=-1.0), r"tucker_penalty must be .* >= 0"),
    "inf balance loss": (lambda: TuckerConfig(d_model=8, balance_loss=float("inf")), r"balance_loss must be a finite"),
    "v1 heads": (lambda: UltraMemConfig(d_model=8, heads=0), r"UltraMemConfig.heads must be a positive int"),
    "quadrants config": (lambda: UltraMemV2Config(d_model=8, prefilter_quadrants=0), r"prefilter_quadrants must be 1 or 2"),
    "ring too small": (lambda: ring_layout(4, 8, 1e-9), r"share_ratio=1e-09 is too small"),
}


@pytest.mark.parametrize("name", sorted(CONFIG_CASES))
def test_bad_config_is_refused(name):
    fn, pattern = CONFIG_CASES[name]
    with pytest.raises(ValueError, match=pattern) as err:
        fn()
    assert "\n" not in str(err.value)  # one line


@pytest.mark.parametrize("name", sorted(CASES))
def test_errors_are_one_line(name):
    fn, exc, _ = CASES[name]
    with pytest.raises(exc) as err:
        fn()
    assert "\n" not in str(err.value)


LAYERS = {
    "pkm": lambda: PKM(PKMConfig(d_model=16, n_keys=4, topk=2, query_norm="layer")),
    "ultramem": lambda: UltraMem(UltraMemConfig(d_model=16, n_keys=4, topm=2, heads=2)),
    "ultramemv2": lambda: UltraMemV2(UltraMemV2Config(d_model=16, n_keys=4, topm=2)),
}


@pytest.mark.parametrize("name", sorted(LAYERS))
@pytest.mark.parametrize("x", [torch.randn(3, 17), torch.ones(3, 16, dtype=torch.long), torch.tensor(1.0)],
                         ids=["width", "int", "scalar"])
def test_layer_input_is_checked(name, x):
    with pytest.raises(ValueError, match=r"x must be a floating-point tensor \[\.\.\., d_model=16\], got"):
        LAYERS[name]()(x)


def test_layer_configs_accept_the_triton_backend_before_kernels_are_imported():
    """'triton' registers when `kernels` is imported, possibly after the config is built."""
    assert PKMConfig(d_model=8, backend="triton").backend == "triton"
    assert UltraMemV2Config(d_model=8, backend="torch").backend == "torch"
