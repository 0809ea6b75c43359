"""The link approximations of the GLM predictive and the running NLL metric.

Closed forms are checked against formulas written out independently here, the
Monte-Carlo link against a Gauss-Hermite quadrature (C = 2) and a large-sample
estimate, and the Laplace bridge against numbers produced by laplace-torch 0.3.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch.testing import assert_close

from laplace.predictive.links import (
    LINKS,
    bridge,
    bridge_norm,
    condition_sum_zero,
    dirichlet_from_gaussian,
    link,
    mc,
    mc_gaussian,
    probit,
    sample_outputs,
)
from laplace.utils.enums import LinkApprox
from laplace.utils.metrics import RunningNLLMetric

DT = torch.float64

# Regression fixtures: laplace-torch 0.3, installed in a separate environment and run
# only as a black box. "fitted_full_mlp" is the (f_mu, f_var) of a FullLaplace fitted
# on a 3-5-4 tanh MLP (classification); the other cases are random Gaussians fed to
# its predictive in place of the GLM moments. "probit", "bridge" and "bridge_norm" are
# what `la(x, link_approx=...)` returned for those moments.
LAPLACE_TORCH_FIXTURES = {
    "fitted_full_mlp": {
        "f_mu": [
            [
                0.24968087419313756,
                0.32931027898636167,
                -0.26727804028646607,
                0.46834885690232386,
            ],
            [
                0.2501700027685462,
                0.39733095748293557,
                -0.22198376628647992,
                0.25010427042047606,
            ],
        ],
        "f_var": [
            [
                [
                    0.6009259553373262,
                    0.4058918924186055,
                    0.3858228804582521,
                    0.4241276403744413,
                ],
                [
                    0.40589189241860557,
                    0.6278768930682733,
                    0.3677057983056566,
                    0.45589497698196796,
                ],
                [
                    0.3858228804582521,
                    0.3677057983056566,
                    0.647950889158299,
                    0.3992335614807333,
                ],
                [
                    0.4241276403744413,
                    0.45589497698196796,
                    0.3992335614807333,
                    0.6153971358539799,
                ],
            ],
            [
                [
                    0.8621878713357349,
                    0.47434242844644736,
                    0.4830819052727815,
                    0.4994668184725831,
                ],
                [
                    0.4743424284464474,
                    0.8698274509927647,
                    0.41860041744991344,
                    0.5292015257935734,
                ],
                [
                    0.48308190527278133,
                    0.41860041744991355,
                    0.9709939726096144,
                    0.471114192220386,
                ],
                [
                    0.4994668184725832,
                    0.5292015257935734,
                    0.471114192220386,
                    0.8892311826980168,
                ],
            ],
        ],
        "probit": [
            [
                0.25520983328989255,
                0.27381464145829054,
                0.16059177717974302,
                0.310383748072074,
            ],
            [
                0.26307476118087575,
                0.29864308133383877,
                0.17544649228049877,
                0.2628356652047868,
            ],
        ],
        "bridge": [
            [
                0.2559159314763344,
                0.2519873273477271,
                0.1613894568016578,
                0.33070728437428065,
            ],
            [
                0.2732352022545589,
                0.2692488903667743,
                0.17675379684156423,
                0.2807621105371028,
            ],
        ],
        "bridge_norm": [
            [
                0.23768858427901862,
                0.25400206033747014,
                0.11154402382409344,
                0.39676533155941773,
            ],
            [
                0.27375599721592275,
                0.29363297460792226,
                0.1520354487764822,
                0.2805755793996729,
            ],
        ],
    },
    "c3_unit": {
        "f_mu": [
            [0.6613521715704522, 0.2669240982925188, 0.061677258237348306],
            [0.6213173286854216, -0.45190596470388295, -0.16613023453557194],
        ],
        "f_var": [
            [
                [1.2580066887676222, -0.24645210058430636, -0.3897038223741582],
                [-0.24645210058430636, 0.5043991188024478, 0.2950145714821857],
                [-0.3897038223741582, 0.2950145714821857, 0.3647403452535447],
            ],
            [
                [0.5386406153947424, 0.010056760709465581, 0.18276211712201976],
                [0.010056760709465581, 0.2480462681712412, 0.03606712305051522],
                [0.18276211712201976, 0.03606712305051522, 0.19370655084101007],
            ],
        ],
        "probit": [
            [0.42380431711585365, 0.31483944151327864, 0.2613562413708677],
            [0.5394008720166753, 0.19925717286796937, 0.2613419551153554],
        ],
        "bridge": [
            [0.15520811907659715, 0.43849018029747694, 0.4063017006259259],
            [0.34504652282498977, 0.17095092935448988, 0.4840025478205204],
        ],
        "bridge_norm": [
            [0.16885726656277322, 0.4319455740352047, 0.3991971594020221],
            [0.670909326210511, 0.07208411227813787, 0.2570065615113511],
        ],
    },
    "c2": {
        "f_mu": [
            [2.710177458160376, 3.7754143859056932],
            [0.18385798405699233, -0.5146891367763439],
        ],
        "f_var": [
            [
                [1.801237283520856, 2.237542460246585],
                [2.237542460246585, 3.804253828441647],
            ],
            [
                [2.443907846355231, -1.3697643132557866],
                [-1.3697643132557866, 2.3172282119333056],
            ],
        ],
        "probit": [
            [0.42151641869981654, 0.5784835813001834],
            [0.623341383203186, 0.3766586167968139],
        ],
        "bridge": [
            [0.5556322299742913, 0.44436777002570865],
            [0.6724479937821984, 0.32755200621780156],
        ],
        "bridge_norm": [
            [0.6276636311912804, 0.37233636880871956],
            [0.628442575159525, 0.3715574248404751],
        ],
    },
    "c4_large_var": {
        "f_mu": [
            [
                -0.044460628877568645,
                0.16180257561192143,
                -1.4104720481487907,
                -0.34044383181541504,
            ],
            [
                -3.0120778025227835,
                0.5710133187158932,
                1.4330116093088212,
                1.6688650812210035,
            ],
        ],
        "f_var": [
            [
                [
                    5.660193008587243,
                    1.5458937951276979,
                    2.373121158024498,
                    -4.912436705989276,
                ],
                [
                    1.5458937951276979,
                    30.63640327684247,
                    -12.60481675236714,
                    -8.730658762358207,
                ],
                [
                    2.373121158024498,
                    -12.60481675236714,
                    22.627997431476096,
                    2.5886531950661507,
                ],
                [
                    -4.912436705989276,
                    -8.730658762358207,
                    2.5886531950661507,
                    18.16125003387432,
                ],
            ],
            [
                [
                    10.589792753180934,
                    7.841154929632937,
                    11.445773822201291,
                    -7.443144861752543,
                ],
                [
                    7.841154929632937,
                    31.228916943190928,
                    16.07551281337656,
                    -1.669358383336701,
                ],
                [
                    11.445773822201291,
                    16.07551281337656,
                    34.044532655496255,
                    -9.51110192548416,
                ],
                [
                    -7.443144861752543,
                    -1.669358383336701,
                    -9.51110192548416,
                    12.154788924262808,
                ],
            ],
        ],
        "probit": [
            [
                0.27500302785334274,
                0.2948218299837834,
                0.1799994112122459,
                0.25017573095062795,
            ],
            [
                0.054209613209865865,
                0.23884634175882105,
                0.2979920254957758,
                0.4089520195355371,
            ],
        ],
        "bridge": [
            [
                0.5738679588895365,
                0.13176733357210255,
                0.13299160363242588,
                0.16137310390593512,
            ],
            [
                0.05452270924260817,
                0.20218198114712896,
                0.2793648904033303,
                0.46393041920693256,
            ],
        ],
        "bridge_norm": [
            [
                0.5646920217621086,
                0.1096871296885536,
                0.1582115895490605,
                0.16740925900027726,
            ],
            [
                0.23717579802005387,
                0.29054185212492456,
                0.22313347953319718,
                0.24914887032182437,
            ],
        ],
    },
    "c3_large_logits": {
        "f_mu": [
            [6.577427711740084, -13.657566385749341, -12.176558789983682],
            [10.883601386978745, 0.45970586156958415, 13.204377966250545],
        ],
        "f_var": [
            [
                [0.2500811286216969, 0.16161855496214617, 0.13570386422699302],
                [0.16161855496214617, 0.4560155425051761, 0.18128998071921945],
                [0.13570386422699302, 0.18128998071921945, 0.21603190702886427],
            ],
            [
                [1.4484220180635667, -0.030892487544006936, -0.18385716782765074],
                [-0.030892487544006936, 0.6697289307997426, 0.31668479137719646],
                [-0.18385716782765074, 0.31668479137719646, 0.2320497849631305],
            ],
        ],
        "probit": [
            [0.9999999777799227, 6.4823714161585504e-09, 1.5737705997452718e-08],
            [0.01886167123550142, 4.780480858230051e-06, 0.9811335482836403],
        ],
        "bridge": [
            [0.9999999433198952, 2.7913506089027943e-08, 2.8766598689387552e-08],
            [4.904616814953811e-06, 2.3022740896178802e-08, 0.9999950723604442],
        ],
        "bridge_norm": [
            [1.0, 5.166510873793483e-29, 3.693507478992739e-30],
            [4.611996164232324e-09, 1.3745841133066685e-13, 0.9999999953878664],
        ],
    },
}
# laplace-torch 0.3's RunningNLLMetric after update(METRIC_PROBS, METRIC_TARGETS)
# and then update(METRIC_PROBS[:3], [1, 1, 1]).
METRIC_PROBS = [
    [0.7962201932492583, 0.124764509649226, 0.0790152971015157],
    [0.06516843322477069, 0.049516675250574044, 0.8853148915246553],
    [0.13467529680149226, 0.5731526313768327, 0.29217207182167515],
    [0.3345092901410062, 0.4507503944275767, 0.21474031543141722],
    [0.26708612243390045, 0.2425615492768532, 0.49035232828924624],
    [0.12685807930788343, 0.22167924319437335, 0.6514626774977432],
]
METRIC_TARGETS = [0, 2, -100, 1, 1, -100]
METRIC_NLL = 1.1723441406549422


def t(x, device="cpu") -> torch.Tensor:
    return torch.tensor(x, dtype=DT, device=device)


def random_gaussian(n: int, c: int, seed: int, var_scale: float = 1.0, device="cpu"):
    """Drawn on the CPU (the same numbers on every device), moved to ``device``."""
    g = torch.Generator().manual_seed(seed)
    f_mu = torch.randn(n, c, generator=g, dtype=DT)
    A = torch.randn(n, c, c, generator=g, dtype=DT)
    f_var = var_scale * (A @ A.mT / c + 0.1 * torch.eye(c, dtype=DT))
    return f_mu.to(device), f_var.to(device)


# ---------------------------------------------------------------------- probit


def probit_by_hand(f_mu: torch.Tensor, f_var: torch.Tensor) -> torch.Tensor:
    """softmax(mu_k / sqrt(1 + pi/8 Sigma_kk)), one entry at a time with `math`."""
    out = torch.empty_like(f_mu)
    for i in range(f_mu.shape[0]):
        z = [
            f_mu[i, k].item() / math.sqrt(1.0 + math.pi / 8.0 * f_var[i, k, k].item())
            for k in range(f_mu.shape[1])
        ]
        top = max(z)
        e = [math.exp(v - top) for v in z]
        out[i] = t([v / sum(e) for v in e], f_mu.device)
    return out


def test_probit_matches_its_formula(device):
    f_mu, f_var = random_gaussian(5, 4, seed=0, var_scale=3.0, device=device)
    assert_close(probit(f_mu, f_var), probit_by_hand(f_mu, f_var))


def test_probit_accepts_the_diagonal(device):
    f_mu, f_var = random_gaussian(5, 4, seed=1, device=device)
    diag = torch.diagonal(f_var, dim1=1, dim2=2)
    assert_close(probit(f_mu, diag), probit(f_mu, f_var))


def test_probit_limits(device):
    f_mu, _ = random_gaussian(4, 3, seed=2, device=device)
    zero = torch.zeros(4, 3, 3, dtype=DT, device=device)
    assert_close(probit(f_mu, zero), torch.softmax(f_mu, -1))
    huge = 1e12 * torch.eye(3, dtype=DT, device=device).expand(4, 3, 3)
    assert_close(
        probit(f_mu, huge),
        torch.full((4, 3), 1 / 3, dtype=DT, device=device),
        atol=1e-6,
        rtol=0,
    )


# ---------------------------------------------------------------------- bridge


@pytest.mark.parametrize("case", sorted(LAPLACE_TORCH_FIXTURES))
@pytest.mark.parametrize("name", ["probit", "bridge", "bridge_norm"])
def test_links_match_laplace_torch(case, name, device):
    fx = LAPLACE_TORCH_FIXTURES[case]
    out = LINKS[name](t(fx["f_mu"], device=device), t(fx["f_var"], device=device))
    assert_close(out, t(fx[name], device=device), atol=1e-12, rtol=1e-10)


def test_condition_sum_zero_is_gaussian_conditioning(device):
    # Oracle: condition the joint Gaussian of (f, 1^T f) on 1^T f = 0 densely.
    f_mu, f_var = random_gaussian(3, 4, seed=3, device=device)
    mu, var = condition_sum_zero(f_mu, f_var)
    one = torch.ones(4, dtype=DT, device=device)
    for i in range(3):
        cov_fs = f_var[i] @ one  # Cov(f, 1^T f)
        var_s = one @ f_var[i] @ one
        mu_expected = f_mu[i] - cov_fs * (one @ f_mu[i]) / var_s
        cov_expected = f_var[i] - torch.outer(cov_fs, cov_fs) / var_s
        assert_close(mu[i], mu_expected)
        assert_close(var[i], torch.diagonal(cov_expected))
        assert_close(
            mu[i].sum(), torch.zeros((), dtype=DT, device=device), atol=1e-12, rtol=0
        )


def test_dirichlet_from_gaussian_by_hand(device):
    # mu = 0: alpha_k = (1 - 2/3 + 3/9) / var_k = (2/3) / var_k
    alpha = dirichlet_from_gaussian(
        torch.zeros(1, 3, dtype=DT, device=device), t([[1.0, 2.0, 4.0]], device=device)
    )
    assert_close(alpha, t([[2 / 3, 1 / 3, 1 / 6]], device=device))
    # a general row: the formula term by term
    mu, var = t([[0.5, -1.0, 2.0]], device=device), t([[0.3, 1.2, 2.5]], device=device)
    s = sum(math.exp(-m) for m in mu[0].tolist())
    expected = [
        (1 - 2 / 3 + math.exp(m) / 9 * s) / v
        for m, v in zip(mu[0].tolist(), var[0].tolist())
    ]
    assert_close(dirichlet_from_gaussian(mu, var), t([expected], device=device))


def test_bridge_two_classes_by_hand(device):
    # C = 2: conditioning on f_1 + f_2 = 0 equalises the variances, and the bridge
    # reduces to softmax(mu'). mu = (1, 0), Sigma = diag(1, 4): r = (1, 4), s = 5,
    # mu' = (1 - 1/5, -4/5) = (0.8, -0.8).
    out = bridge(
        t([[1.0, 0.0]], device=device), torch.diag(t([1.0, 4.0], device=device))[None]
    )
    p = 1 / (1 + math.exp(-1.6))
    assert_close(out, t([[p, 1 - p]], device=device))


def test_bridge_three_classes_by_hand(device):
    # mu = (1, 0, 0), Sigma = I: mu' = mu - 1/3 (bridge ignores a constant shift),
    # Sigma'_kk = 2/3 for all k, so p_k ~ 1 - 2/3 + e^{mu_k} (e^{-1} + 2) / 9.
    w = [1 / 3 + math.exp(m) * (math.exp(-1) + 2) / 9 for m in (1.0, 0.0, 0.0)]
    out = bridge(
        t([[1.0, 0.0, 0.0]], device=device), torch.eye(3, dtype=DT, device=device)[None]
    )
    assert_close(out, t([[v / sum(w) for v in w]], device=device))


@pytest.mark.parametrize("fn", [bridge, bridge_norm])
def test_bridge_diagonal_form_is_a_diagonal_covariance(fn, device):
    f_mu, f_var = random_gaussian(4, 5, seed=4, device=device)
    diag = torch.diagonal(f_var, dim1=1, dim2=2)
    assert_close(fn(f_mu, diag), fn(f_mu, torch.diag_embed(diag)))


def test_bridge_norm_is_scale_free(device):
    # (mu, Sigma) -> (sqrt(c) mu, c Sigma) leaves the normalised Gaussian unchanged.
    f_mu, f_var = random_gaussian(4, 3, seed=5, device=device)
    assert_close(bridge_norm(3.0 * f_mu, 9.0 * f_var), bridge_norm(f_mu, f_var))


@pytest.mark.parametrize("fn", [bridge, bridge_norm])
def test_bridge_is_stable_for_large_logits(fn, device):
    f_mu = t([[1000.0, 0.0, -1000.0], [300.0, 300.0, -300.0]], device=device)
    f_var = torch.eye(3, dtype=DT, device=device).expand(2, 3, 3)
    out = fn(f_mu, f_var)
    assert torch.isfinite(out).all()
    assert_close(out.sum(-1), torch.ones(2, dtype=DT, device=device))
    assert out[0, 0] > 0.99


# ----------------------------------------------------------------- Monte Carlo


def test_mc_on_two_classes_matches_quadrature(device):
    # For C = 2, E[softmax(f)_1] = E[sigmoid(d)], d ~ N(mu_1 - mu_2, v) with
    # v = S_11 + S_22 - 2 S_12: a 1-D Gauss-Hermite quadrature is the oracle.
    f_mu, f_var = random_gaussian(3, 2, seed=6, var_scale=2.0, device=device)
    nodes, weights = np.polynomial.hermite.hermgauss(80)
    expected = []
    for i in range(3):
        m = (f_mu[i, 0] - f_mu[i, 1]).item()
        v = (f_var[i, 0, 0] + f_var[i, 1, 1] - 2 * f_var[i, 0, 1]).item()
        d = m + math.sqrt(2 * v) * nodes
        p1 = float(np.sum(weights / (1 + np.exp(-d))) / math.sqrt(math.pi))
        expected.append([p1, 1 - p1])
    g = torch.Generator(device).manual_seed(0)
    out = mc_gaussian(f_mu, f_var, n_samples=200_000, generator=g)
    # MC standard error <= 0.5 / sqrt(2e5) ~ 1.1e-3; allow about 4.5 of them.
    assert_close(out, t(expected, device=device), atol=5e-3, rtol=0)


def test_mc_matches_a_large_sample_estimate(device):
    # Brute force: torch.distributions draws, independent of sample_outputs.
    f_mu, f_var = random_gaussian(3, 4, seed=7, var_scale=2.0, device=device)
    torch.manual_seed(123)
    draws = torch.distributions.MultivariateNormal(f_mu, f_var).sample((200_000,))
    expected = torch.softmax(draws, -1).mean(0)
    out = link("mc", f_mu, f_var, 200_000, torch.Generator(device).manual_seed(1))
    # two independent estimates, each with standard error below ~1.1e-3
    assert_close(out, expected, atol=6e-3, rtol=0)


def test_sample_outputs_moments_and_reproducibility(device):
    f_mu, f_var = random_gaussian(2, 3, seed=8, device=device)
    s = sample_outputs(f_mu, f_var, 100_000, torch.Generator(device).manual_seed(2))
    assert s.shape == (100_000, 2, 3)
    assert_close(s.mean(0), f_mu, atol=0.02, rtol=0)
    centred = s - s.mean(0)
    cov = torch.einsum("sni,snj->nij", centred, centred) / (s.shape[0] - 1)
    assert_close(cov, f_var, atol=0.03, rtol=0)
    again = sample_outputs(f_mu, f_var, 100_000, torch.Generator(device).manual_seed(2))
    assert torch.equal(s, again)


def test_sample_outputs_diagonal_form_equals_diagonal_covariance(device):
    f_mu, f_var = random_gaussian(3, 4, seed=9, device=device)
    diag = torch.diagonal(f_var, dim1=1, dim2=2)
    a = sample_outputs(f_mu, diag, 5, torch.Generator(device).manual_seed(3))
    b = sample_outputs(
        f_mu, torch.diag_embed(diag), 5, torch.Generator(device).manual_seed(3)
    )
    assert_close(a, b)


def test_sample_outputs_handles_singular_covariances(device):
    v = t([1.0, -2.0, 0.5], device=device)
    f_mu = t([[0.1, 0.2, 0.3], [1.0, -1.0, 0.0], [0.0, 0.0, 0.0]], device=device)
    centring = torch.eye(3, dtype=DT, device=device) - 1 / 3  # PSD, rank 2, singular
    f_var = torch.stack(
        [torch.outer(v, v), torch.zeros(3, 3, dtype=DT, device=device), centring]
    )
    s = sample_outputs(f_mu, f_var, 1000, torch.Generator(device).manual_seed(4))
    assert torch.isfinite(s).all()
    dev = s - f_mu
    # rank one: every deviation is a multiple of v
    coef = dev[:, 0] @ v / (v @ v)
    assert_close(dev[:, 0], coef[:, None] * v, atol=1e-6, rtol=0)
    # zero covariance: the samples are the mean
    assert_close(
        dev[:, 1], torch.zeros(1000, 3, dtype=DT, device=device), atol=1e-6, rtol=0
    )
    # sum-zero covariance: deviations sum to zero
    assert_close(
        dev[:, 2].sum(-1), torch.zeros(1000, dtype=DT, device=device), atol=1e-6, rtol=0
    )


def test_mc_averages_softmax_over_samples(device):
    g = torch.Generator().manual_seed(5)
    samples = torch.randn(7, 2, 3, dtype=DT, generator=g).to(device)
    expected = sum(torch.softmax(samples[s], -1) for s in range(7)) / 7
    assert_close(mc(samples), expected)


# ------------------------------------------------------------------- gradients


@pytest.mark.parametrize("fn", [probit, bridge, bridge_norm])
def test_gradients_wrt_mean_and_covariance(fn, device):
    f_mu, f_var = random_gaussian(2, 3, seed=10, device=device)
    f_mu.requires_grad_(True)
    f_var.requires_grad_(True)
    assert torch.autograd.gradcheck(fn, (f_mu, f_var))


def test_mc_gradients_wrt_mean_and_covariance(device):
    f_mu, f_var = random_gaussian(2, 3, seed=11, device=device)
    f_mu.requires_grad_(True)
    f_var.requires_grad_(True)

    def fn(m, v):
        # Cholesky reads one triangle, so perturb symmetrically; same draws each call
        v = (v + v.mT) / 2
        return mc_gaussian(m, v, 16, torch.Generator(device).manual_seed(6))

    assert torch.autograd.gradcheck(fn, (f_mu, f_var))


# -------------------------------------------------------------------- dispatch


def test_dispatch_table_covers_link_approx(device):
    assert set(LINKS) == {m.value for m in LinkApprox}
    f_mu, f_var = random_gaussian(2, 3, seed=12, device=device)
    for member in LinkApprox:
        g1, g2 = (
            torch.Generator(device).manual_seed(7),
            torch.Generator(device).manual_seed(7),
        )
        by_enum = link(member, f_mu, f_var, n_samples=8, generator=g1)
        by_str = link(member.value, f_mu, f_var, n_samples=8, generator=g2)
        assert_close(by_enum, by_str)
    assert_close(link("probit", f_mu, f_var), probit(f_mu, f_var))


def test_unknown_link_names_the_valid_ones():
    f_mu, f_var = random_gaussian(2, 3, seed=13)
    with pytest.raises(ValueError, match="'probit'.*'bridge'.*'bridge_norm'.*'mc'"):
        link("laplace", f_mu, f_var)


@pytest.mark.parametrize("fn", [probit, bridge, bridge_norm, mc_gaussian])
@pytest.mark.parametrize(
    "shapes", [((3,), (3, 3)), ((2, 3), (2, 3, 4)), ((2, 3), (3, 3, 3)), ((2, 3), (3,))]
)
def test_bad_shapes_raise(fn, shapes):
    with pytest.raises(ValueError, match="shape"):
        fn(torch.zeros(shapes[0], dtype=DT), torch.ones(shapes[1], dtype=DT))


def test_other_bad_input_raises():
    with pytest.raises(ValueError, match="at least 2 classes"):
        bridge(torch.zeros(2, 1, dtype=DT), torch.ones(2, 1, 1, dtype=DT))
    with pytest.raises(ValueError, match="n_samples"):
        sample_outputs(torch.zeros(2, 3, dtype=DT), torch.ones(2, 3, dtype=DT), 0)
    with pytest.raises(ValueError, match=r"\(S, N, C\)"):
        mc(torch.zeros(4, 3, dtype=DT))


# ---------------------------------------------------------------------- metric


def test_running_nll_matches_a_direct_computation():
    g = torch.Generator().manual_seed(14)
    metric = RunningNLLMetric()
    all_p, all_y = [], []
    for n in (5, 3, 7):
        p = torch.softmax(torch.randn(n, 4, generator=g, dtype=DT), -1)
        y = torch.randint(0, 4, (n,), generator=g)
        y[0] = -100
        metric.update(p, y)
        all_p.append(p)
        all_y.append(y)
    p, y = torch.cat(all_p), torch.cat(all_y)
    keep = y != -100
    expected = -torch.log(p[keep, y[keep]]).mean()
    result = metric.compute()
    assert result.dtype == DT
    assert_close(result, expected)
    loss = torch.nn.functional.nll_loss(p.log(), y, ignore_index=-100)
    assert_close(result, loss)
    metric.reset()
    metric.update(p[:2], y[:2])
    assert_close(metric.compute(), -torch.log(p[1, y[1]]))


def test_running_nll_custom_ignore_index_and_token_shapes():
    g = torch.Generator().manual_seed(15)
    p = torch.softmax(torch.randn(2, 3, 4, generator=g, dtype=DT), -1)
    y = torch.tensor([[0, 3, 7], [7, 1, 2]])
    metric = RunningNLLMetric(ignore_index=7)
    metric.update(p, y)
    logs = [p[0, 0, 0], p[0, 1, 3], p[1, 1, 1], p[1, 2, 2]]
    assert_close(metric.compute(), -torch.stack(logs).log().mean())


def test_running_nll_matches_laplace_torch():
    p, y = t(METRIC_PROBS), torch.tensor(METRIC_TARGETS)
    metric = RunningNLLMetric()
    metric.update(p, y)
    metric.update(p[:3], torch.tensor([1, 1, 1]))
    assert_close(metric.compute(), t(METRIC_NLL))


def test_running_nll_bad_input_raises():
    metric = RunningNLLMetric()
    p = torch.full((3, 2), 0.5, dtype=DT)
    with pytest.raises(ValueError, match="shape"):
        metric.update(p, torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="integer"):
        metric.update(p, torch.zeros(3, dtype=DT))
    with pytest.raises(ValueError, match=r"\[0, 2\)"):
        metric.update(p, torch.tensor([0, 1, 2]))
