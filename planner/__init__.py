"""DAPPLE planner: profiles, cluster model, schedule library, cost models, plan search and plan
files."""

from planner.plan_format import Plan, PlanError, Stage, even_plan, parse_notation
from planner.profile import LayerCost, Profile, ProfileError
from planner.cluster import Cluster, ClusterError
from planner.api import plan

__all__ = [
    "Cluster",
    "ClusterError",
    "LayerCost",
    "Plan",
    "PlanError",
    "Profile",
    "ProfileError",
    "Stage",
    "even_plan",
    "parse_notation",
    "plan",
]
