"""train/hf.py: DSTCallback runs the Sparsifier's mask updates inside transformers.Trainer, on a
BertForMaskedLM built from a config with its encoder linears sparse."""
import pytest
import torch

pytest.importorskip("accelerate", reason="transformers.Trainer needs accelerate: pip install -e '.[hf]'")
transformers = pytest.importorskip("transformers")

import dst  # noqa: E402
from models.sparsify import sparsify  # noqa: E402
from train.hf import DSTCallback  # noqa: E402


def _bert():
    cfg = transformers.BertConfig(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=128, max_position_embeddings=64)
    return transformers.BertForMaskedLM(cfg)


class _Tokens(torch.utils.data.Dataset):
    def __init__(self, n=64, seq=16):
        g = torch.Generator().manual_seed(0)
        self.ids = torch.randint(5, 128, (n, seq), generator=g)
        self.labels = torch.where(torch.rand(n, seq, generator=g) < 0.15, self.ids, torch.full_like(self.ids, -100))

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.labels[i]}


@pytest.mark.parametrize("method, accumulation", [("rigl", 1), ("rigl", 2), ("dynadiag", 1)])
def test_trainer_runs_the_mask_updates_and_keeps_each_layers_budget(method, accumulation, tmp_path):
    torch.manual_seed(0)
    model = _bert()
    cfg = dst.DSTConfig.for_method(method, sparsity=0.8, delta_t=2)
    names = sparsify(model, lambda name, lin: dst.make_layer(cfg, lin.in_features, lin.out_features, 0.2),
                     include=r"encoder\..*(query|key|value|dense)$")
    assert len(names) == 12   # 6 linears a block, 2 blocks
    sparsifier = dst.Sparsifier(model, cfg, total_steps=6)
    before = {n: [b.clone() for b in m.buffers()] for n, m in sparsifier.layers.items()}
    callback = DSTCallback(sparsifier)
    args = transformers.TrainingArguments(output_dir=str(tmp_path), max_steps=6, per_device_train_batch_size=8,
                                          gradient_accumulation_steps=accumulation, learning_rate=1e-3,
                                          report_to=[], save_strategy="no", disable_tqdm=True, use_cpu=True,
                                          logging_steps=100, dataloader_num_workers=0)
    transformers.Trainer(model=model, args=args, train_dataset=_Tokens(), callbacks=[callback]).train()
    steps = [s for s, _ in callback.updates]
    if method == "rigl":
        assert steps == [2, 4]   # every delta_t = 2 steps, before t_end 0.75 x 6 = 4.5
        assert {n: m.nnz() for n, m in sparsifier.layers.items()} == sparsifier.budgets
        changed = [n for n, m in sparsifier.layers.items()
                   if any(not torch.equal(a, b) for a, b in zip(before[n], m.buffers()))]
        assert changed == list(sparsifier.layers)   # every layer's pattern moved
    else:
        assert steps and sparsifier.frozen   # resampled, then frozen at 0.3 x 6 = step 2
