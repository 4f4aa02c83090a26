"""Helpers the test modules share: ask in a cell, expect a one-line error, compare with the classic recipe."""

import pytest
from IPython.core.error import UsageError
from IPython.utils.capture import capture_output


def ask(ip, text, line=""):
    """Run ``%%qwen line`` with ``text`` as the cell body; return what it displayed and printed."""
    with capture_output() as captured:
        ip.run_cell_magic("qwen", line, text)
    return captured


def usage_error(call, *args):
    """Call a magic that must refuse; return its message, checked to be one line of the exact class."""
    with pytest.raises(UsageError) as error:
        call(*args)
    assert type(error.value) is UsageError  # the exact class: IPython prints it as one line
    message = str(error.value)
    assert "\n" not in message
    return message


def replies_match_the_recipe(ip, classic, questions, line, max_new_tokens):
    """Ask each question in turn; every reply must be the classic recipe's greedy reply to the same history.

    Returns the history (as the recipe saw it) and what the last cell displayed.
    """
    history = []
    for question in questions:
        shown = ask(ip, question, line)
        history.append({"role": "user", "content": question})
        history.append({"role": "assistant", "content": classic.reply(history, max_new_tokens)})
        assert ip.user_ns["_qwen"] == history[-1]["content"]
        assert shown.outputs[-1].data["text/markdown"].startswith(history[-1]["content"])
    return history, shown


def transformers_scores(logits, prompt, temperature, top_k, top_p, penalty):
    """The scores (one row, float32) transformers' sampling processors leave for ``logits`` after ``prompt``: repetition
    penalty, temperature, top-k and top-p, in generate's order; -inf where a token may not be drawn."""
    import torch
    from transformers.generation.logits_process import (
        RepetitionPenaltyLogitsProcessor, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper)

    scores = logits.float().clone()
    ids = torch.tensor([prompt], device=logits.device)
    for process in [RepetitionPenaltyLogitsProcessor(penalty), TemperatureLogitsWarper(temperature), TopKLogitsWarper(top_k),
                    TopPLogitsWarper(top_p)]:
        scores = process(ids, scores)
    return scores[0]
