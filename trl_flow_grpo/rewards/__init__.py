"""Reward functions for Flow-GRPO and the machinery that calls them.

A reward function follows TRL's convention: a callable (sync or `async def`, function or object) called with the
keywords `prompts`, `images`, every other dataset column, and `trainer_state`, returning one float (or `None` for
"not applicable") per sample. Built-in reward functions can be referred to by name; they are registered in
`REWARD_FUNCS` (defined in `trl_flow_grpo.rewards.base`, the single place a new built-in is added).

Pref-GRPO's preference functions compare two images of one prompt and return P(image a preferred) per pair; see
`trl_flow_grpo.rewards.preferences` (protocol, `PREFERENCE_FUNCS`, `ScalarPreference`) and
`trl_flow_grpo.rewards.judge` (vision-language judges, local or behind an OpenAI-compatible server).

A reward can also run in another process: `trl_flow_grpo.rewards.server` serves one over HTTP
(`trl-flow-grpo reward-server`) and `RemoteReward` (`trl_flow_grpo.rewards.remote`) is its client.
"""

from .base import REWARD_FUNCS, RewardFunc, call_reward_funcs, resolve_reward_func, reward_func_name, with_timeout
from .compression import jpeg_compressibility, jpeg_incompressibility
from .judge import (
    DEFAULT_JUDGE_MODEL_ID,
    JUDGE_PROMPT_TEMPLATE,
    JudgeRequestError,
    OpenAIJudge,
    TransformersJudge,
    build_judge_prompt,
    encode_image,
    parse_verdict,
)
from .preferences import (
    PREFERENCE_FUNCS,
    PreferenceFunc,
    ScalarPreference,
    call_preference_funcs,
    preference_func_name,
    resolve_preference_func,
)
from .remote import RemoteReward, RewardServerError

__all__ = [
    "with_timeout",
    "DEFAULT_JUDGE_MODEL_ID",
    "JUDGE_PROMPT_TEMPLATE",
    "PREFERENCE_FUNCS",
    "REWARD_FUNCS",
    "JudgeRequestError",
    "OpenAIJudge",
    "PreferenceFunc",
    "RemoteReward",
    "RewardFunc",
    "RewardServerError",
    "ScalarPreference",
    "TransformersJudge",
    "build_judge_prompt",
    "call_preference_funcs",
    "call_reward_funcs",
    "encode_image",
    "jpeg_compressibility",
    "jpeg_incompressibility",
    "parse_verdict",
    "preference_func_name",
    "resolve_preference_func",
    "resolve_reward_func",
    "reward_func_name",
]
