"""Response-only loss, adapter training (full and LoRA), and the frozen middle."""

import pytest
import torch

from fed_crash.config import TrainConfig
from fed_crash.core.data import IGNORE, batches, collate, pad_id, tokenize
from fed_crash.core.emulator import EmulatorSpec, build_emulator
from fed_crash.core.train import evaluate, response_loss, train_adapters
from tests.conftest import ROWS


def test_response_loss_matches_the_models_own_loss(tiny_model, tokenizer):
    batch = collate(tokenize(ROWS[:3], tokenizer, max_length=256), pad_id(tokenizer))
    total, n = response_loss(tiny_model, batch)
    reference = tiny_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]).loss
    assert n == int((batch["labels"][:, 1:] != -100).sum())
    assert float(total.detach()) / n == pytest.approx(float(reference.detach()), rel=1e-5)


@pytest.mark.parametrize("lora_rank", [0, 4])
def test_training_lowers_the_loss_and_touches_only_adapters(tiny_model, tokenizer, lora_rank):
    examples = tokenize(ROWS, tokenizer, max_length=256)
    pad = pad_id(tokenizer)
    emulator = build_emulator(tiny_model, EmulatorSpec(8, 2, 2, kept=(3, 5)))
    before = {k: v.clone() for k, v in emulator.model.state_dict().items()}
    start = evaluate(emulator.model, examples, pad, progress=False)["loss"]
    metrics = train_adapters(emulator, examples, pad, TrainConfig(steps=28, lr=3e-3, batch_size=8, lora_rank=lora_rank), progress=False)
    end = evaluate(emulator.model, examples, pad, progress=False)["loss"]
    assert end < start - 0.1
    per_epoch = sum(sum(label != IGNORE for label in e.labels[1:]) for e in examples)  # the labelled next tokens
    assert len(examples) == 32 and metrics.steps == 28 and metrics.tokens == 7 * per_epoch  # 28 steps of 8 = 7 passes over 32 rows
    after = emulator.model.state_dict()
    assert set(after) == set(before)  # LoRA merged away: plain weights again
    prefix = emulator.prefix
    for key in before:
        position = int(key[len(prefix) + 1:].split(".")[0]) if key.startswith(prefix + ".") else None
        moved = not torch.equal(before[key], after[key])
        if position in (0, 1, 6, 7):
            continue  # adapters (some, e.g. norms under LoRA, legitimately stay)
        assert not moved, f"frozen tensor {key} changed"
    adapter_moved = [k for k in before if k.startswith(f"{prefix}.0.") and not torch.equal(before[k], after[k])]
    assert adapter_moved


def test_extra_loss_is_added(tiny_model, tokenizer):
    examples = tokenize(ROWS[:8], tokenizer, max_length=256)
    emulator = build_emulator(tiny_model, EmulatorSpec(8, 2, 2, kept=(4,)))
    grads = []

    def penalty():
        term = sum(p.pow(2).sum() for p in emulator.trainable_parameters()) * 0.0
        term.register_hook(lambda g: grads.append(float(g)))  # d(loss)/d(term): 1 when it is added to the loss as it is
        return term

    train_adapters(emulator, examples, pad_id(tokenizer), TrainConfig(steps=3, batch_size=4), extra_loss=penalty, progress=False)
    assert grads == [1.0, 1.0, 1.0]


def test_step_times_are_the_median_after_the_first(tiny_model, tokenizer, monkeypatch):
    """A clock that advances only inside the steps, by 0.5, 0.1, 0.2, 0.3, 0.9 s (median and mean of the last four differ)."""
    import fed_crash.core.train as train

    examples = tokenize(ROWS[:8], tokenizer, max_length=256)
    emulator = build_emulator(tiny_model, EmulatorSpec(8, 2, 2, kept=(4,)))
    now, steps = [0.0], iter([0.5, 0.1, 0.2, 0.3, 0.9])

    def advance():
        now[0] += next(steps)
        return torch.zeros(())

    monkeypatch.setattr(train, "time", type("Clock", (), {"perf_counter": staticmethod(lambda: now[0])}))
    result = train_adapters(emulator, examples, pad_id(tokenizer), TrainConfig(steps=5, batch_size=4), extra_loss=advance, progress=False)
    assert result.first_step_seconds == pytest.approx(0.5)
    assert result.step_seconds == pytest.approx(0.25)  # median of 0.1, 0.2, 0.3, 0.9 (their mean is 0.375)
    assert result.seconds == pytest.approx(2.0)


def test_evaluate_reports_loss_and_perplexity(tiny_model, tokenizer):
    examples = tokenize(ROWS[:4], tokenizer, max_length=256)
    result = evaluate(tiny_model, examples, pad_id(tokenizer), batch_size=3, progress=False)
    total = sum(float(response_loss(tiny_model, b)[0].detach()) for b in batches(examples, 4, pad_id(tokenizer)))
    tokens = sum(sum(label != IGNORE for label in e.labels[1:]) for e in examples)
    assert result["tokens"] == tokens
    assert result["loss"] == pytest.approx(total / tokens, rel=1e-5)
    empty = evaluate(tiny_model, [], pad_id(tokenizer), progress=False)
    assert empty == {"loss": 0.0, "ppl": 1.0, "tokens": 0}
    assert result["ppl"] == pytest.approx(torch.tensor(result["loss"]).exp().item(), rel=1e-5)
