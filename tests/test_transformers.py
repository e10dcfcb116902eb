"""S-SGD in the Hugging Face Trainer: SSGDTrainer against the plain loop, resume, the plain Trainer's error.

A tiny GPT-2 built from a config (nothing downloaded), dropout off so that both sides see the same
function; the Trainer's own loss normalisation (num_items_in_batch), weight-decay groups, linear
schedule, clipping and bf16 autocast are reproduced in the plain loop.
"""

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

import ssgd_fused  # noqa: E402
from ssgd_fused.integrations.transformers import SSGDTrainer  # noqa: E402

CONFIG = dict(vocab_size=64, n_positions=16, n_embd=32, n_layer=2, n_head=2, resid_pdrop=0.0, embd_pdrop=0.0,
              attn_pdrop=0.0, bos_token_id=0, eos_token_id=0, loss_type="ForCausalLM")
BATCH, GA, STEPS, CLIP = 4, 2, 4, 0.5


def make_model():
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(transformers.GPT2Config(**CONFIG))


@pytest.fixture
def tokens():
    return torch.randint(0, CONFIG["vocab_size"], (BATCH * GA * STEPS, 12))


def dataset(tokens):
    return [{"input_ids": row, "labels": row} for row in tokens]


def arguments(out, **kwargs):
    kwargs = {"per_device_train_batch_size": BATCH, "gradient_accumulation_steps": GA, "max_steps": STEPS,
              "learning_rate": 1e-3, "weight_decay": 0.1, "max_grad_norm": CLIP, "logging_steps": 1,
              "save_strategy": "no", "report_to": "none", "use_cpu": True, "disable_tqdm": True, **kwargs}
    return transformers.TrainingArguments(output_dir=str(out), **kwargs)


def params_equal(a, b):
    return all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


@pytest.mark.parametrize("bf16", [False, True])
def test_ssgd_trainer_equals_plain_loop(tmp_path, tokens, bf16):
    """SSGDTrainer builds SSGD(AdamW) from TrainingArguments; gradient accumulation runs every
    micro-batch at w+n and w-n under one noise, clipping acts on the mean gradient, bf16 autocast;
    same bits as the plain loop, and the logged loss is the mean over the passes."""
    args = arguments(tmp_path, bf16=bf16, train_sampling_strategy="sequential")
    model = make_model()
    trainer = SSGDTrainer(model=model, args=args, train_dataset=dataset(tokens),
                          ssgd_kwargs={"noise": 0.5, "seed": 11})
    trainer.train()
    ssgd = ssgd_fused.integrations.unwrap(trainer.optimizer)
    assert isinstance(ssgd, ssgd_fused.SSGD) and ssgd.noise_step == STEPS

    ref = make_model()
    base_cls, base_kwargs = transformers.Trainer.get_optimizer_cls_and_kwargs(args, ref)
    assert base_cls is type(ssgd.base_optimizer)
    decay = set(trainer.get_decay_parameter_names(ref))
    groups = [{"params": [p for n, p in ref.named_parameters() if n in decay], "weight_decay": 0.1},
              {"params": [p for n, p in ref.named_parameters() if n not in decay], "weight_decay": 0.0}]
    opt = ssgd_fused.SSGD(groups, base_cls, **base_kwargs, noise=0.5, seed=11)
    sched = transformers.get_linear_schedule_with_warmup(opt, 0, STEPS)
    losses, norms = [], []
    for step in range(STEPS):
        micro = tokens[step * GA * BATCH:(step + 1) * GA * BATCH].split(BATCH)
        items = torch.tensor(sum(mb.numel() for mb in micro))  # the Trainer's num_items_in_batch
        opt.zero_grad()
        total = 0.0
        for _ in opt.twin_passes():
            for mb in micro:
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                    loss = ref(input_ids=mb, labels=mb, num_items_in_batch=items).loss.float()
                loss.backward()
                total += loss.item()
        norms.append(torch.nn.utils.clip_grad_norm_(ref.parameters(), CLIP).item())
        opt.step()
        sched.step()
        losses.append(total / 2)
    assert params_equal(model, ref)
    logged = [h for h in trainer.state.log_history if "loss" in h]
    assert [h["loss"] for h in logged] == pytest.approx(losses, rel=1e-5)
    assert [h["grad_norm"] for h in logged] == pytest.approx(norms, rel=1e-5)
    assert max(norms) > CLIP  # the clipping acted


def test_resume_from_checkpoint_is_bitwise(tmp_path, tokens):
    """4 steps, or resume from the step-2 checkpoint for the last 2 (random sampler, SSGD state in
    optimizer.pt): the same trajectory, the same noise stream."""
    kwargs = {"save_strategy": "steps", "save_steps": 2, "train_sampling_strategy": "random"}
    whole = make_model()
    first = SSGDTrainer(model=whole, args=arguments(tmp_path / "a", **kwargs), train_dataset=dataset(tokens),
                        ssgd_kwargs={"noise": 0.5})
    first.train()
    resumed = make_model()
    torch.nn.init.zeros_(resumed.transformer.h[0].mlp.c_fc.weight)  # must come from the checkpoint
    second = SSGDTrainer(model=resumed, args=arguments(tmp_path / "b", **kwargs), train_dataset=dataset(tokens),
                         ssgd_kwargs={"noise": 0.5})
    second.train(resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-2"))
    a, b = (ssgd_fused.integrations.unwrap(t.optimizer) for t in (first, second))
    assert (b.seed, b.noise_step) == (a.seed, a.noise_step) == (a.seed, STEPS)
    assert params_equal(whole, resumed)
    assert [h["loss"] for h in second.state.log_history if "loss" in h] == \
        [h["loss"] for h in first.state.log_history if "loss" in h]


def test_plain_trainer_with_ssgd_names_ssgd_trainer(tmp_path, tokens):
    """The plain Trainer runs one backward and calls optimizer.step() bare: a clear error."""
    model = make_model()
    opt = ssgd_fused.SSGD(model.parameters(), torch.optim.AdamW, lr=1e-3)
    w = model.transformer.h[0].mlp.c_fc.weight.detach().clone()
    trainer = transformers.Trainer(model=model, args=arguments(tmp_path), train_dataset=dataset(tokens),
                                   optimizers=(opt, None))
    with pytest.raises(RuntimeError, match="ssgd_fused.integrations.transformers.SSGDTrainer"):
        trainer.train()
    assert torch.equal(model.transformer.h[0].mlp.c_fc.weight, w)  # nothing updated
