"""Mixed precision on the CPU, the allocator rule that follows it, and the thread policy (docs/performance.md).

The precision tests force each answer of the CPU check, so they test the same code on a CPU with native bf16
and on one without.
"""

from __future__ import annotations

import functools

import pytest
import torch

import villa.engine.device as device_module
from villa.engine.device import (
    amp_dtype,
    autocast,
    configure_threads,
    cpu_flags_have_native_bf16,
    keeps_cpu_memory,
    torch_threads_for,
)
from villa.engine.training import fit
from villa.mapping.data import Stage1Dataset, collate_stage1
from villa.mapping.loss import MappingLoss
from villa.mapping.model import MappingModel
from villa.storage.errors import VillaError
from villa.vlm.loss import symmetric_info_nce

CPU = torch.device("cpu")


@pytest.fixture
def native_bf16(monkeypatch):
    """Set what the CPU check answers: ``native_bf16(True)``."""

    def set_answer(answer: bool) -> None:
        monkeypatch.setattr(device_module, "cpu_has_native_bf16", lambda: answer)
        device_module._note_amp_stays_float32.cache_clear()

    return set_answer


def test_native_bf16_is_read_from_the_cpu_flags():
    zen4 = "processor\t: 0\nflags\t\t: fpu sse avx2 avx512f avx512bw avx512_vnni avx512_bf16 vaes\n"
    sapphire = "flags\t\t: fpu avx512f amx_tile amx_bf16 amx_int8\n"
    skylake = "flags\t\t: fpu avx2 avx512f avx512bw avx512dq avx512vl\n"  # bf16 only emulated by oneDNN
    assert cpu_flags_have_native_bf16(zen4) and cpu_flags_have_native_bf16(sapphire)
    assert not cpu_flags_have_native_bf16(skylake)
    assert not cpu_flags_have_native_bf16("")


def test_amp_on_a_cpu_with_native_bf16_autocasts_to_bf16(native_bf16):
    native_bf16(True)
    assert amp_dtype(CPU) == torch.bfloat16
    layer = torch.nn.Linear(8, 4)
    with autocast(CPU, True):
        assert layer(torch.randn(2, 8)).dtype == torch.bfloat16
    with autocast(CPU, False):
        assert layer(torch.randn(2, 8)).dtype == torch.float32


def test_amp_on_a_cpu_without_it_stays_float32_with_one_note(native_bf16, capsys):
    native_bf16(False)
    assert amp_dtype(CPU) is None
    layer = torch.nn.Linear(8, 4)
    for _ in range(3):  # every training step enters autocast: the note comes once
        with autocast(CPU, True):
            assert layer(torch.randn(2, 8)).dtype == torch.float32
    out = capsys.readouterr().out
    assert out.count("\n") == 1 and out.startswith("note: this CPU has no native bf16"), out


def test_losses_stay_float32_under_bf16_autocast():
    gen = torch.Generator().manual_seed(0)
    image, text = torch.randn(6, 16, generator=gen), torch.randn(6, 16, generator=gen)
    expected = symmetric_info_nce(image, text)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = symmetric_info_nce(image.bfloat16(), text.bfloat16())
    assert got.dtype == torch.float32
    # the inputs' bf16 rounding only (logits in bf16 would be off by up to ~0.06 each at tau 0.07)
    assert float(got) == pytest.approx(float(expected), abs=2e-2)


def _stage1_split(n: int, seed: int) -> Stage1Dataset:
    gen = torch.Generator().manual_seed(seed)
    regions = torch.randn(n, 4, 8, generator=gen)
    mask = torch.arange(4) < torch.randint(1, 5, (n,), generator=gen).unsqueeze(1)
    regions[~mask] = 0.0
    return Stage1Dataset.from_padded(regions, mask, torch.rand(n, 5, generator=gen) < 0.4)


def test_stage1_resident_validation_loss_runs_under_bf16_autocast():
    # the whole-split loss scatters float32 scores: under autocast its similarities came out bf16 and failed
    data = _stage1_split(23, seed=1)
    attr = torch.randn(5, 8, generator=torch.Generator().manual_seed(4))
    model = MappingModel(8, num_attributes=5, seed=5).eval()
    loss_fn = MappingLoss(attr, reference_quirk=True)
    with torch.no_grad():
        fp32_total, items = loss_fn.dataset_loss(
            model, data.regions, data.counts, data.multi_hot, batch_size=5
        )
        with torch.autocast("cpu", dtype=torch.bfloat16):
            bf16_total, bf16_items = loss_fn.dataset_loss(
                model, data.regions, data.counts, data.multi_hot, batch_size=5
            )
    assert bf16_total.dtype == torch.float32 and int(bf16_items) == int(items)
    assert float(bf16_total) == pytest.approx(float(fp32_total), rel=2e-2)


def test_stage1_trains_under_bf16_autocast(native_bf16, tmp_path):
    native_bf16(True)
    train, val = _stage1_split(40, seed=6), _stage1_split(12, seed=7)
    attr = torch.randn(5, 8, generator=torch.Generator().manual_seed(8))
    model = MappingModel(8, num_attributes=5, seed=9)
    result = fit(
        model,
        train,
        val,
        MappingLoss(attr, reference_quirk=True),
        collate_fn=collate_stage1,
        batch_size=8,
        epochs=2,
        optimizer_factory=functools.partial(torch.optim.AdamW, lr=1e-2),
        run_dir=tmp_path,
        device=CPU,
        progress=False,
        amp=True,
        cpu_keep_freed_memory=False,
    )
    assert all(torch.isfinite(torch.tensor([r["train_loss"], r["val_loss"]])).all() for r in result.history)
    assert all(p.dtype == torch.float32 for p in model.parameters())  # autocast keeps float32 weights


@pytest.mark.parametrize(
    "setting,native,amp,expected",
    [
        ("auto", True, True, True),  # bf16 activations: keeping the heap stays under the float32 peak
        ("auto", True, False, False),  # amp off: float32, the kept peak would grow
        ("auto", False, True, False),  # no native bf16: float32
        (None, True, True, True),
        (True, False, False, True),
        ("false", True, True, False),
        ("TRUE", False, False, True),
    ],
)
def test_keeping_freed_memory_follows_bf16_unless_set(native_bf16, setting, native, amp, expected):
    native_bf16(native)
    assert keeps_cpu_memory(setting, CPU, amp) is expected


def test_keeping_freed_memory_is_never_automatic_off_the_cpu(native_bf16):
    native_bf16(True)
    assert keeps_cpu_memory("auto", torch.device("meta"), True) is False


def test_a_bad_keep_setting_is_one_line():
    with pytest.raises(VillaError, match="cpu_keep_freed_memory must be auto, true or false"):
        keeps_cpu_memory("sometimes", CPU, True)


@pytest.mark.parametrize(
    "cores,processes,workers,expected",
    [(2, 1, 0, 2), (2, 2, 0, 1), (16, 4, 0, 4), (16, 4, 2, 2), (2, 1, 4, 1), (1, 8, 0, 1), (3, 2, 0, 1)],
)
def test_threads_split_the_cores_among_processes_and_loader_workers(cores, processes, workers, expected):
    assert torch_threads_for(cores, processes, workers) == expected


@pytest.fixture
def restore_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_configure_threads_reads_torchrun_processes_on_this_machine(monkeypatch, restore_threads):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(device_module, "usable_cores", lambda: 8)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert configure_threads("auto") == 2 and torch.get_num_threads() == 2
    assert configure_threads("auto", loader_workers=1) == 1
    monkeypatch.delenv("LOCAL_WORLD_SIZE")
    assert configure_threads(None) == 8 and torch.get_num_threads() == 8


def test_configure_threads_keeps_an_explicit_choice(monkeypatch, restore_threads):
    monkeypatch.setattr(device_module, "usable_cores", lambda: 8)
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert configure_threads("auto") == 3  # the environment's choice
    assert configure_threads(1) == 1 and torch.get_num_threads() == 1  # threads=1
    assert configure_threads("2") == 2


@pytest.mark.parametrize("bad", ["many", -1, "1.5"])
def test_a_bad_thread_count_is_one_line(bad, restore_threads):
    with pytest.raises(VillaError, match="threads must be auto or a positive number"):
        configure_threads(bad)


def test_the_commands_set_threads_from_the_config(restore_threads):
    from villa.engine.hydra_app import _configure_threads, compose, register_resolvers

    register_resolvers()
    cfg = compose(["experiment=stage1", "data_dir=x", "threads=1"])
    _configure_threads(cfg)
    assert torch.get_num_threads() == 1


def test_evaluation_embeds_in_float32_on_a_cpu_with_bf16(native_bf16, tiny_docmnist):
    # a CPU's metrics must not depend on whether it has bf16: the untrained tower's near-identical region
    # vectors rank differently in bf16
    from villa.evaluation.run import evaluate_model

    native_bf16(True)
    with_amp = evaluate_model(data_dir=tiny_docmnist, device="cpu", amp=True, detection=False, progress=False)
    without = evaluate_model(data_dir=tiny_docmnist, device="cpu", amp=False, detection=False, progress=False)
    keys = ("text_to_region_r_precision", "region_to_text_r_precision", "zero_shot_auroc")
    assert {k: with_amp[k] for k in keys} == {k: without[k] for k in keys}
