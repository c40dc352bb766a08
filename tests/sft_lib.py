"""Rank functions for the instruction-tuning tests (importable by spawned ranks)."""

from __future__ import annotations

import numpy
import torch

from tests.parity_lib import loaded_model


def _batch(dataset, indices) -> dict:
    samples = [dataset[i] for i in indices]
    return {key: torch.stack([torch.as_tensor(s[key]) for s in samples]) for key in samples[0]}


def sft_parity(ckpt_dir: str, prefix: str, seq_length: int, count: int) -> dict:
    """On the checkpoint's model (fp32, TP=PP=1), for the first `count` samples of a chat set:

    - `batch_loss`: the trainer's loss on one padded batch of them (one sample per row);
    - `alone`: each sample's summed target loss, the sample alone in its sequence;
    - `packed`: the same from packed sequences, with the packed layout;
    - `grads_same_when_untrained_labels_change`, `grads_change_when_a_target_label_changes`: the
      weight gradients of the batch loss under edits of the labels at untrained / trained positions.
    """
    from megatron_llamapro.data.chat_indexed import ChatIndexedDataset
    from megatron_llamapro.data.sft import ChatSamples, SFTDataset, SFTSettings
    from megatron_llamapro.pipeline import packed_forward_inputs
    from megatron_llamapro.training.step import _loss_sums, _token_sum_loss

    with loaded_model(ckpt_dir, 1, 1) as (_, chunks):
        model = chunks[0]
        chat = ChatIndexedDataset(prefix)
        indices = [numpy.arange(count)]

        def dataset(packing: str) -> SFTDataset:
            return SFTDataset(ChatSamples([chat], indices, SFTSettings(seq_length, packing, pad_id=0), "t"), None)

        padded, packed = dataset("pad"), dataset("pack")

        def losses(batch):
            return model(**packed_forward_inputs(model, batch)).float()

        rows = list(range(len(padded)))
        batch = _batch(padded, rows)
        batch_loss_sum, batch_tokens = _loss_sums(batch, losses(batch))
        with torch.no_grad():
            per_token = losses(batch) * batch["loss_mask"]
        alone = [float(per_token[i].sum()) for i in rows]

        packed_sums = {}
        with torch.no_grad():
            for index in range(len(packed)):
                one = _batch(packed, [index])
                per_token = (losses(one) * one["loss_mask"])[0]
                for segment, ref in enumerate(packed.refs(index)):
                    packed_sums[int(ref)] = float(per_token[one["segment_ids"][0] == segment].sum())
        layout = [len(packed.refs(i)) for i in range(len(packed))]

        def grads(edit) -> list[torch.Tensor]:
            model.zero_grad(set_to_none=True)
            b = {k: v.clone() for k, v in batch.items()}
            edit(b)
            _token_sum_loss(b, losses(b))[0].backward()
            return [p.grad.detach().clone() for p in model.parameters() if p.grad is not None]

        def untrained(b):
            b["labels"][b["loss_mask"] == 0] = (b["labels"][b["loss_mask"] == 0] + 7) % chat_vocab
        def trained(b):
            where = torch.nonzero(b["loss_mask"])[0]
            b["labels"][where[0], where[1]] = (b["labels"][where[0], where[1]] + 7) % chat_vocab

        chat_vocab = int(max(int(chat[i][0].max()) for i in range(count))) + 1
        reference = grads(lambda b: None)
        same = all(torch.equal(a, b) for a, b in zip(reference, grads(untrained)))
        changed = any(not torch.equal(a, b) for a, b in zip(reference, grads(trained)))
        return {"batch_loss": float(batch_loss_sum / batch_tokens), "alone": alone,
                "packed": [packed_sums[i] for i in range(count)], "layout": layout,
                "grads_same_when_untrained_labels_change": same,
                "grads_change_when_a_target_label_changes": changed}
