"""Turn a scheduler plan into one forward pass: flat token batch, slot mapping, block tables, masks."""

from __future__ import annotations

import torch

from torch_engine.model import KVCache, PagedDecoder
from torch_engine.model.decoder import PrefillChunk, StepInput
from torch_engine.scheduler import Plan, Scheduled


class ModelRunner:
    def __init__(self, decoder: PagedDecoder, kv: KVCache) -> None:
        self.decoder = decoder
        self.kv = kv
        self.block_size = kv.block_size

    def _slots(self, table: list[int], start: int, end: int) -> list[int]:
        bs = self.block_size
        return [table[p // bs] * bs + p % bs for p in range(start, end)]

    def run(self, plan: Plan) -> tuple[torch.Tensor, list[Scheduled]]:
        """Returns next-token logits for the scheduled sequences that finish their pending tokens
        this step, and which those are (in row order)."""
        for src, dst, tokens in plan.copies:
            self.kv.copy_block(src, dst, tokens)
        bs = self.block_size
        decodes = [item for item in plan.items if item.seq.pending == 1 and item.seq.computed > 0]
        prefills = [item for item in plan.items if not (item.seq.pending == 1 and item.seq.computed > 0)]
        ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        for item in decodes:
            seq = item.seq
            ids.append(seq.token_ids[seq.computed])
            positions.append(seq.computed)
            slots.extend(self._slots(seq.table.blocks, seq.computed, seq.computed + 1))
        decode_blocks = decode_mask = lengths = None
        if decodes:
            width = max(len(item.seq.table.blocks) for item in decodes)
            decode_blocks = torch.zeros(len(decodes), width, dtype=torch.long)
            lengths = torch.empty(len(decodes), dtype=torch.long)
            for r, item in enumerate(decodes):
                table = item.seq.table.blocks
                decode_blocks[r, :len(table)] = torch.tensor(table, dtype=torch.long)
                lengths[r] = item.seq.computed + 1
            decode_mask = (torch.arange(width * bs)[None, :] < lengths[:, None]).view(len(decodes), 1, 1, -1)
        chunks = []
        for item in prefills:
            seq, start = item.seq, item.seq.computed
            end = start + item.tokens
            offset = len(ids)
            ids.extend(seq.token_ids[start:end])
            positions.extend(range(start, end))
            slots.extend(self._slots(seq.table.blocks, start, end))
            if start == 0:
                chunks.append(PrefillChunk(offset, item.tokens, None, None))
            else:
                nblocks = -(-end // bs)
                context = torch.tensor(seq.table.blocks[:nblocks], dtype=torch.long)
                query_pos = torch.arange(start, end)[:, None]
                mask = torch.arange(nblocks * bs)[None, :] <= query_pos
                chunks.append(PrefillChunk(offset, item.tokens, context, mask))
        # Rows that need logits: every decode, and prefills whose chunk reaches the end of their tokens.
        sampled = list(decodes)
        rows = list(range(len(decodes)))
        for item, chunk in zip(prefills, chunks, strict=True):
            if item.tokens == item.seq.pending:
                sampled.append(item)
                rows.append(chunk.start + chunk.length - 1)
        step = StepInput(
            input_ids=torch.tensor(ids, dtype=torch.long), positions=torch.tensor(positions, dtype=torch.long),
            slot_mapping=torch.tensor(slots, dtype=torch.long), num_decode=len(decodes),
            decode_blocks=decode_blocks, decode_mask=decode_mask, decode_lengths=lengths, prefills=chunks,
            logits_rows=torch.tensor(rows, dtype=torch.long),
        )
        return self.decoder.forward(step, self.kv), sampled
