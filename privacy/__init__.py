"""The privacy core: pure maths and mechanisms (numpy, scipy and randomgen only).

Importing this package never imports torch, faiss or grpc (a test checks it in a subprocess).

* ``rdp``: RDP of the Poisson-subsampled Gaussian (Mironov, Talwar & Zhang 2019).
* ``conversion``: RDP -> (epsilon, delta) (Balle et al. 2020, Thm 21).
* ``mechanism``: the DP-RDM profile, its RDP curve and its release step.
* ``accountant``: events and a composing accountant with JSON state.
* ``budget``: the admission rules (single profile, by RDP or PLD; Rényi filter).
* ``pld``: privacy loss distributions (dp-accounting, imported lazily) for single-profile budgets.
* ``calibration``: solve sigma, k or q for a target; maximum number of queries.
* ``rng``: the CSPRNG for coins and noise.
"""

from .accountant import RdpAccountant, RetrievalEvent, SubsampledGaussianEvent, event_rdp, retrieval_rdp
from .budget import (
    ACCOUNTANTS,
    Budget,
    check_delta_for_size,
    choose_filter_order,
    default_delta,
    filter_capacity,
    mechanism_rdp,
)
from .calibration import calibrate_k, calibrate_q, calibrate_sigma, epsilon_for, max_queries
from .conversion import DeltaResult, EpsilonResult, delta_from_rdp, epsilon_from_rdp
from .mechanism import Profile, clamp_unit, profile_rdp, release
from .orders import DEFAULT_ORDERS, OPACUS_ORDERS
from .pld import GaussianPair, PldPlan, epsilon_pld, max_queries_pld, pld_dominating_pair, pld_plan
from .rdp import rdp_subsampled_gaussian
from .rng import check_dp_generator, make_dp_generator, new_dp_generator

__all__ = [
    "ACCOUNTANTS",
    "DEFAULT_ORDERS",
    "OPACUS_ORDERS",
    "Budget",
    "DeltaResult",
    "EpsilonResult",
    "GaussianPair",
    "PldPlan",
    "Profile",
    "RdpAccountant",
    "RetrievalEvent",
    "SubsampledGaussianEvent",
    "calibrate_k",
    "calibrate_q",
    "calibrate_sigma",
    "check_delta_for_size",
    "check_dp_generator",
    "choose_filter_order",
    "clamp_unit",
    "default_delta",
    "delta_from_rdp",
    "epsilon_for",
    "epsilon_from_rdp",
    "epsilon_pld",
    "event_rdp",
    "filter_capacity",
    "make_dp_generator",
    "max_queries",
    "max_queries_pld",
    "mechanism_rdp",
    "new_dp_generator",
    "pld_dominating_pair",
    "pld_plan",
    "profile_rdp",
    "rdp_subsampled_gaussian",
    "release",
    "retrieval_rdp",
]
