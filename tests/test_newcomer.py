"""What a newcomer meets first: a mistyped flag names the flag meant; chat.py --beams=K works alone."""
import pytest

from babyllama.config import parse_config
from babyllama.errors import ConfigError
from chat import ChatConfig
from eval import EvalConfig


def test_mistyped_flag_suggests_the_flag_meant():
    with pytest.raises(ConfigError, match="did you mean --temperature"):
        parse_config(EvalConfig, ["--temprature=0.5"])
    with pytest.raises(ConfigError, match="--zzz.*--help"):
        parse_config(EvalConfig, ["--zzz=1"])


def test_chat_beams_alone_turns_sampling_off():
    cfg = parse_config(ChatConfig, ["--beams=4"])
    assert (cfg.beams, cfg.temperature, cfg.top_k, cfg.top_p, cfg.repetition_penalty) == (4, 0.0, 0, 1.0, 1.0)
    assert parse_config(ChatConfig, []).temperature > 0  # sampling stays chat's default
    with pytest.raises(ConfigError, match="deterministic"):  # a sampling knob the user set still conflicts
        parse_config(ChatConfig, ["--beams=4", "--temperature=0.7"])
