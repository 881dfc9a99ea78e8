"""Targeted poisoning attacks, found through a registry (``create_attack(name, **kw)``)."""

from . import (  # noqa: F401  (registration)
    bullseye_polytope,
    feature_collision,
    gradient_matching,
    sleeper_agent,
)
from .base import (
    ATTACKS,
    Attack,
    AttackSpec,
    Crafted,
    Crafting,
    Target,
    ThreatModel,
    as_ensemble,
    attack_summary,
    create_attack,
    list_attacks,
    project,
    register_attack,
    select_bases,
    to_poison_set,
)

__all__ = ["ATTACKS", "Attack", "AttackSpec", "Crafted", "Crafting", "Target", "ThreatModel",
           "as_ensemble", "attack_summary", "create_attack", "list_attacks", "project",
           "register_attack", "select_bases", "to_poison_set"]
