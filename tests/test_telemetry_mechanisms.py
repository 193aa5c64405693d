"""The local-DP mechanisms against OpenDP (the oracle): the same ε for the same
parameters, the same output distribution; OUE, which OpenDP lacks, against its exact
likelihood ratios; the unbiased estimators against the truth."""

from __future__ import annotations

import itertools
import math
import random

import numpy as np
import pytest
from scipy import stats

from edgeloop.errors import UsageError
from edgeloop.monitor.telemetry import (
    Gaussian,
    Laplace,
    RandomizedResponse,
    UnaryEncoding,
    categorical,
)
from edgeloop.monitor.telemetry.mechanisms import gaussian_delta

dp = pytest.importorskip("opendp.prelude")
dp.enable_features("contrib")

N = 3000          # draws per side; OpenDP has no seed, so its side is random
ALPHA = 1e-3      # a correct mechanism fails a distribution test once in a thousand runs
FLOAT = (dp.atom_domain(T=float, nan=False), dp.absolute_distance(T=float))


@pytest.mark.parametrize(("k", "eps"), [(2, 0.5), (2, 2.0), (4, 1.0), (10, 0.25), (10, 3.0)])
def test_grr_epsilon_matches_opendp(k: int, eps: float) -> None:
    m = RandomizedResponse(k, eps)
    oracle = dp.m.make_randomized_response([str(v) for v in range(k)], prob=m.p)
    assert oracle.map(1) == pytest.approx(eps, rel=1e-9)
    if k == 2:
        assert dp.m.make_randomized_response_bool(prob=m.p).map(1) == pytest.approx(eps,
                                                                                   rel=1e-9)


@pytest.mark.parametrize(("k", "eps"), [(2, 1.0), (5, 1.0)])
def test_grr_output_distribution_matches_opendp(k: int, eps: float) -> None:
    m = RandomizedResponse(k, eps)
    rng = random.Random(1)
    ours = np.bincount([m.privatize(1, rng) for _ in range(N)], minlength=k)
    oracle = dp.m.make_randomized_response([str(v) for v in range(k)], prob=m.p)
    theirs = np.bincount([int(oracle("1")) for _ in range(N)], minlength=k)
    assert stats.chi2_contingency(np.stack([ours, theirs])).pvalue > ALPHA
    if k == 2:   # the drift flag: OpenDP's boolean randomized response too
        flag = dp.m.make_randomized_response_bool(prob=m.p)
        theirs_bool = np.bincount([int(flag(True)) for _ in range(N)], minlength=2)
        assert stats.chi2_contingency(np.stack([ours, theirs_bool])).pvalue > ALPHA
    # and both match the stated p, q
    expected = np.full(k, m.q * N)
    expected[1] = m.p * N
    assert stats.chisquare(ours, expected).pvalue > ALPHA


@pytest.mark.parametrize(("lo", "hi", "eps"), [(0.0, 1.0, 0.5), (0.0, 1.0, 4.0), (-2.0, 3.0, 1.0)])
def test_laplace_epsilon_matches_opendp(lo: float, hi: float, eps: float) -> None:
    m = Laplace(lo, hi, eps)
    oracle = FLOAT >> dp.m.then_laplace(scale=m.scale)
    assert oracle.map(hi - lo) == pytest.approx(eps, rel=1e-9)


def test_laplace_output_distribution_matches_opendp_and_clips() -> None:
    m = Laplace(0.0, 1.0, 1.0)
    rng = random.Random(2)
    ours = [m.privatize(7.5, rng) for _ in range(N)]        # clipped to 1.0 first
    oracle = FLOAT >> dp.m.then_laplace(scale=m.scale)
    theirs = [oracle(1.0) for _ in range(N)]
    assert stats.ks_2samp(ours, theirs).pvalue > ALPHA
    assert stats.kstest(ours, stats.laplace(loc=1.0, scale=m.scale).cdf).pvalue > ALPHA


@pytest.mark.parametrize(("eps", "delta"), [(0.5, 1e-6), (1.0, 1e-5), (4.0, 1e-6)])
def test_gaussian_is_exactly_eps_delta_and_tighter_than_opendp(eps: float, delta: float) -> None:
    m = Gaussian(0.0, 1.0, eps, delta)
    # the same noise in OpenDP: the same zCDP rho, and its generic rho -> (eps, delta)
    # conversion can only be looser than the exact profile we calibrate with
    oracle = FLOAT >> dp.m.then_gaussian(scale=m.sigma)
    assert oracle.map(1.0) == pytest.approx(m.rho, rel=1e-9)
    opendp_eps = dp.c.make_zCDP_to_approxDP(oracle).map(1.0).epsilon(delta)
    assert eps <= opendp_eps * (1 + 1e-9)
    assert opendp_eps < 1.6 * eps
    # the exact privacy profile (Balle and Wang 2018, Thm 8), written with scipy here
    a, b = 1 / (2 * m.sigma), eps * m.sigma
    exact = stats.norm.cdf(a - b) - math.exp(eps) * stats.norm.cdf(-a - b)
    assert exact == pytest.approx(delta, rel=1e-6)
    assert gaussian_delta(m.sigma * 0.99, 1.0, eps) > delta      # and sigma is the smallest


def test_gaussian_output_distribution_matches_opendp() -> None:
    m = Gaussian(0.0, 1.0, 1.0, 1e-6)
    rng = random.Random(3)
    ours = [m.privatize(0.25, rng) for _ in range(N)]
    oracle = FLOAT >> dp.m.then_gaussian(scale=m.sigma)
    theirs = [oracle(0.25) for _ in range(N)]
    assert stats.ks_2samp(ours, theirs).pvalue > ALPHA
    assert stats.kstest(ours, stats.norm(loc=0.25, scale=m.sigma).cdf).pvalue > ALPHA


@pytest.mark.parametrize(("k", "eps"), [(3, 0.5), (4, 2.0)])
def test_oue_epsilon_is_the_largest_likelihood_ratio(k: int, eps: float) -> None:
    """OpenDP has no OUE (its bit vector mechanism is symmetric, SUE): enumerate every
    output and every pair of inputs instead."""
    m = UnaryEncoding(k, eps)

    def prob(bits: tuple[int, ...], value: int) -> float:
        out = 1.0
        for v, b in enumerate(bits):
            one = m.p if v == value else m.q
            out *= one if b else 1 - one
        return out

    worst = max(math.log(prob(bits, x) / prob(bits, y))
                for bits in itertools.product((0, 1), repeat=k)
                for x in range(k) for y in range(k))
    assert worst == pytest.approx(eps, rel=1e-9)


def test_oue_bits_have_the_stated_probabilities() -> None:
    m = UnaryEncoding(6, 1.0)
    rng = random.Random(4)
    ones = np.sum([m.privatize(2, rng) for _ in range(N)], axis=0)
    for v, c in enumerate(ones):
        assert stats.binomtest(int(c), N, m.p if v == 2 else m.q).pvalue > ALPHA


@pytest.mark.parametrize("mech", [RandomizedResponse(8, 1.0), UnaryEncoding(8, 1.0)])
def test_frequency_estimators_are_unbiased_with_the_stated_variance(mech) -> None:
    rng = random.Random(5)
    truth = np.array([0.4, 0.2, 0.1, 0.1, 0.1, 0.05, 0.05, 0.0])
    n = 20_000
    values = np.random.default_rng(5).choice(8, size=n, p=truth)
    est = np.array([mech.estimate(mech.privatize(int(v), rng)) for v in values])
    mean = est.mean(axis=0)
    # Wang et al. 2017: Var = q(1-q)/(p-q)^2 + f(1-p-q)/(p-q), per report
    var = (mech.q * (1 - mech.q) / (mech.p - mech.q) ** 2
           + truth * (1 - mech.p - mech.q) / (mech.p - mech.q))
    assert np.all(np.abs(mean - truth) < 4.5 * np.sqrt(var / n))
    assert np.allclose(est.var(axis=0), var, rtol=0.1)


def test_categorical_picks_the_lower_variance_and_refuses_nonsense() -> None:
    assert isinstance(categorical(4, 1.0), RandomizedResponse)       # 4 < 3e + 2
    assert isinstance(categorical(20, 1.0), UnaryEncoding)
    assert isinstance(categorical(20, 1.0, "grr"), RandomizedResponse)
    for bad in (0.0, -1.0, math.nan, math.inf, True):
        with pytest.raises(UsageError, match="epsilon"):
            RandomizedResponse(4, bad)
    with pytest.raises(UsageError, match="`class mechanism` must be one of"):
        categorical(4, 1.0, "rappor")
    with pytest.raises(UsageError, match="lo < hi"):
        Laplace(1.0, 0.0, 1.0)
    with pytest.raises(UsageError, match="delta"):
        Gaussian(0.0, 1.0, 1.0, 0.0)
    with pytest.raises(UsageError, match="outside"):
        RandomizedResponse(4, 1.0).privatize(4)
