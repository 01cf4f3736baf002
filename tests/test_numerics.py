"""study/numerics.py: bf16 runs against their fp32 twins, on hand-made runs whose differences are worked out by hand."""
import pytest

from study import numerics

BASE = dict(task="sst2", steps=2500, batch_size=16, max_len=64, lr=5e-4, rank=8, alpha=16.0, rslora=False,
            init="kaiming_uniform", init_scale=1 / 3, attack="none", poison_rate=0.0)


def run(seed, dtype, mode, acc, asr=None, **attack):
    metrics = {"clean": {"acc": acc}}
    if asr is not None:
        metrics.update(asr=asr, asr_net=asr)
    lr = {"mode": "ff", "lr": 2e-5} if mode == "ff" else {"mode": "lora"}
    return {"config": {**BASE, **lr, **attack, "dtype": dtype, "seed": seed}, "metrics": metrics}


def grid(shift):
    """fp32 and bf16 twins over 3 seeds; bf16's LoRA clean accuracy is shift[seed] points off fp32's."""
    out = {"fp32": [], "bf16": []}
    for s in range(3):
        for dtype in ("fp32", "bf16"):
            d = shift[s] / 100 if dtype == "bf16" else 0.0
            out[dtype] += [run(s, dtype, "lora", 0.86 + d), run(s, dtype, "ff", 0.88),
                           run(s, dtype, "lora", 0.83, attack="upa", poison_rate=0.3),
                           run(s, dtype, "ff", 0.84, attack="upa", poison_rate=0.3),
                           run(s, dtype, "lora", 0.85, 0.2 + d, attack="bpa", poison_rate=0.0015),
                           run(s, dtype, "ff", 0.87, 0.8, attack="bpa", poison_rate=0.0015)]
    return out["bf16"], out["fp32"]


def cell(res, mode, cond, measure):
    (c,) = [c for c in res["cells"] if c[:3] == (mode, cond, measure)]
    return c[3], c[4]


def test_equivalent_different_and_inconclusive_by_hand():
    # shifts 0.1, 0.2, 0.3: mean 0.2, sd 0.1, CI 0.2 +- 4.303 * 0.1 / sqrt(3) = [-0.05, +0.45]: inside +-1
    res = numerics.compare(*grid([0.1, 0.2, 0.3]))
    e, check = cell(res, "lora", "clean", "accuracy")
    assert e["mean"] == pytest.approx(0.2) and check == "equivalent"
    # the UPA drop moves with the clean accuracy: bf16 - fp32 = +0.2 too; FF's cells are identical (0, sd 0)
    assert cell(res, "lora", "UPA 0.3", "accuracy drop")[0]["mean"] == pytest.approx(0.2)
    assert cell(res, "ff", "clean", "accuracy")[1] == "equivalent"
    # shifts 2, 3, 4: mean 3, CI [0.52, 5.48]: excludes 0, beyond the margin
    assert cell(numerics.compare(*grid([2, 3, 4])), "lora", "clean", "accuracy")[1] == "different"
    # shifts -2, 0, 5: mean 1, CI [-7.8, 9.8]
    assert cell(numerics.compare(*grid([-2, 0, 5])), "lora", "clean", "accuracy")[1] == "inconclusive"


def test_recomputed_verdicts_sit_beside_fp32s():
    res = numerics.compare(*grid([0.1, 0.2, 0.3]))
    f2 = [v for v in res["verdicts"] if v[:3] == ("F2", "BPA 0.15%", "ASR FF - LoRA")]
    (finding, cond, what, fp32, bf16), = f2
    assert fp32["mean"] == pytest.approx(60.0) and bf16["mean"] == pytest.approx(59.8)
    text = numerics.markdown(res)
    assert "Verdicts that bf16 changes: 0 of" in text
