"""Reward functions for Flow-GRPO and the machinery that calls them.

A reward function follows TRL's convention: a callable (sync or `async def`, function or object) called with the
keywords `prompts`, `images`, every other dataset column, and `trainer_state`, returning one float (or `None` for
"not applicable") per sample. Built-in reward functions can be referred to by name; they are registered in
`REWARD_FUNCS` (defined in `trl_flow_grpo.rewards.base`, the single place a new built-in is added).
"""

from .base import REWARD_FUNCS, RewardFunc, call_reward_funcs, resolve_reward_func, reward_func_name
from .compression import jpeg_compressibility, jpeg_incompressibility

__all__ = [
    "REWARD_FUNCS",
    "RewardFunc",
    "call_reward_funcs",
    "jpeg_compressibility",
    "jpeg_incompressibility",
    "resolve_reward_func",
    "reward_func_name",
]
