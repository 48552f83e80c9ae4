"""The command line's arguments: a bad value, key or command is a one-line error before any
work; --help shows every default; every way of generating shares one set of sampling
defaults."""

from __future__ import annotations

import argparse

import pytest
import torch

from lmforge.cli import _sampling, build_parser, main
from lmforge.config import PERPLEXITY_WINDOW, ModelConfig, SamplingConfig

# "nowhere" is no model: an argument error must come before anything looks for it.
BAD_VALUES = [
    ["generate", "nowhere", "--max-new-tokens", "-1"],
    ["generate", "nowhere", "--temperature", "-1"],
    ["generate", "nowhere", "--top-p", "2"],
    ["generate", "nowhere", "--temperature", "nan"],
    ["generate", "nowhere", "--temperature", "warm"],
    ["chat", "nowhere", "--top-k", "0"],
    ["chat", "nowhere", "--repetition-penalty", "0"],
    ["eval", "nowhere", "--task", "perplexity", "--window", "-5"],
    ["eval", "nowhere", "--task", "generation", "--batch-size", "0"],
    ["serve", "nowhere", "--max-batch", "0"],
    ["serve", "nowhere", "--port", "70000"],
    ["serve", "nowhere", "--max-body-mb", "0"],
    ["serve", "nowhere", "--max-body-mb", "4096"],
    ["serve", "nowhere", "--max-images", "-1"],
    ["translate", "nowhere", "--beam", "0"],
    ["finetune", "nowhere", "--data", "x.jsonl", "--lr", "-1"],
    ["prepare", "x.txt", "--out", "y", "--val-fraction", "1.5"],
]


def subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    return next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices


@pytest.mark.parametrize("argv", BAD_VALUES, ids=lambda argv: " ".join(argv[2:]))
def test_a_bad_value_is_a_one_line_error_before_any_work(argv, capsys):
    assert main(argv) == 2
    out, err = capsys.readouterr()
    assert out == ""  # no prompt echoed, nothing loaded
    assert err.count("\n") == 1, err
    assert f"lmforge {argv[0]}: error: argument" in err and "--help" in err


def test_a_misspelt_command_suggests_the_closest(capsys):
    assert main(["genrate", "smollm2-135m-instruct"]) == 2
    err = capsys.readouterr().err
    assert err == "lmforge: error: no command 'genrate': did you mean `lmforge generate`?\n"


def test_a_misspelt_option_names_the_command_s_closest_one(capsys):
    assert main(["generate", "smollm2-135m-instruct", "--max-tokens", "40"]) == 2
    err = capsys.readouterr().err
    assert err == ("lmforge generate: error: unrecognized arguments: --max-tokens 40; "
                   "--max-tokens: did you mean --max-new-tokens? "
                   "(see lmforge generate --help)\n")
    assert main(["generate", "m", "--zzzz"]) == 2  # nothing close: no guess
    assert capsys.readouterr().err == ("lmforge generate: error: unrecognized arguments: "
                                       "--zzzz (see lmforge generate --help)\n")


def test_a_misspelt_key_names_the_close_match_without_listing_every_key(capsys):
    assert main(["train", "max_step=5"]) == 2
    err = capsys.readouterr().err
    assert "did you mean 'max_steps'" in err and "valid keys" not in err
    assert err.count("\n") == 1 and len(err) < 120
    assert main(["train", "zzzz=5"]) == 2  # nothing close: then the valid keys help
    assert "valid keys are: data, " in capsys.readouterr().err


def test_a_value_of_the_wrong_type_is_refused_at_once(capsys):
    assert main(["train", "max_steps=many"]) == 2
    assert "max_steps='many' must be a whole number (in overrides)" in capsys.readouterr().err


def test_quickstart_checks_its_overrides_before_fetching_the_corpus(tmp_path, monkeypatch,
                                                                      capsys):
    monkeypatch.setenv("LMFORGE_CACHE", str(tmp_path / "cache"))
    assert main(["quickstart", "max_step=5"]) == 2
    assert "did you mean 'max_steps'" in capsys.readouterr().err
    assert not (tmp_path / "cache" / "corpora").exists()


def test_help_shows_every_options_default():
    for name, parser in subcommands(build_parser()).items():
        text = " ".join(parser.format_help().split())
        for action in parser._actions:
            if action.option_strings and action.default not in (None, False, [],
                                                                 argparse.SUPPRESS):
                # Shown as argparse would, or said in the option's own words.
                said = f"(default: {action.default})" in text or "default" in action.help
                assert said, (name, action.dest)
            if action.dest in ("temperature", "top_p", "repetition_penalty"):
                assert f"(default: {getattr(SamplingConfig(), action.dest)})" in text


@pytest.mark.parametrize("command", ["generate", "chat", "translate"])
def test_commands_share_the_sampling_defaults(command):
    args = build_parser().parse_args([command, "some-model"])
    assert _sampling(args) == SamplingConfig()
    args = build_parser().parse_args([command, "some-model", "--temperature", "0"])
    assert _sampling(args) == SamplingConfig(temperature=0)


def test_chat_sessions_and_the_engine_share_the_defaults(tiny_llama):
    from lmforge.chat import ChatSession
    from lmforge.config import MAX_NEW_TOKENS
    from lmforge.infer.engine import Request
    from lmforge.tokenizer import train_char

    session = ChatSession(tiny_llama(64, 32), train_char("abc"), ())
    assert session.sampling == SamplingConfig() and session.max_new_tokens == MAX_NEW_TOKENS
    assert Request([1]).sampling == SamplingConfig() and Request([1]).max_new_tokens == \
        MAX_NEW_TOKENS


def test_perplexity_windows_are_bounded_by_default():
    """A long-context model is scored in windows of PERPLEXITY_WINDOW tokens unless asked:
    a window's logits take window x vocabulary floats."""
    from lmforge.eval.perplexity import evaluate_perplexity
    from lmforge.models.decoder import Decoder
    from lmforge.tokenizer import train_char

    text = "to be or not to be, that is the question. " * 60
    tokenizer = train_char(text)
    torch.manual_seed(0)
    model = Decoder(ModelConfig(n_layer=1, n_head=2, d_model=16, positions="rope",
                                vocab_size=tokenizer.vocab_size,
                                context_length=4 * PERPLEXITY_WINDOW)).eval()
    result = evaluate_perplexity(model, tokenizer, text)
    assert result.details["window"] == PERPLEXITY_WINDOW < model.cfg.context_length
    assert result.n == len(tokenizer.encode(text)) - 1  # still every token but the first
    assert evaluate_perplexity(model, tokenizer, text, window=2048).details["window"] == 2048


def test_every_training_task_has_a_next_command():
    import lmforge.api  # noqa: F401  (registers every task)
    from lmforge.cli import _NEXT_COMMANDS
    from lmforge.train.task import TASKS

    assert set(_NEXT_COMMANDS) == set(TASKS)
