"""Which token ids end a reasoning step: "\\n" alone (two in a row end a step) or any text with "\\n\\n"."""

import torch


def newline_token_ids(tokenizer) -> tuple[torch.Tensor, torch.Tensor]:
    """Scan the whole vocabulary: (ids decoding to exactly "\\n", ids whose text contains "\\n\\n")."""
    n = len(tokenizer)
    kw = dict(skip_special_tokens=False, clean_up_tokenization_spaces=False)
    if hasattr(tokenizer, "batch_decode"):
        texts = tokenizer.batch_decode([[i] for i in range(n)], **kw)
    else:
        texts = [tokenizer.decode([i], **kw) for i in range(n)]
    nl = [i for i, t in enumerate(texts) if t == "\n"]
    dnl = [i for i, t in enumerate(texts) if "\n\n" in t]
    return torch.tensor(nl, dtype=torch.long), torch.tensor(dnl, dtype=torch.long)


def token_class_table(nl_ids, dnl_ids, device=None) -> torch.Tensor:
    """int8 lookup table: 1 for newline ids, 2 for double-newline ids, 0 otherwise; the last entry (0) is the
    slot that "no token" and ids beyond the table map to."""
    nl = torch.as_tensor(nl_ids, dtype=torch.long).flatten().cpu()
    dnl = torch.as_tensor(dnl_ids, dtype=torch.long).flatten().cpu()
    ids = torch.cat([nl, dnl])
    if ids.numel() and int(ids.min()) < 0:
        raise ValueError("newline token ids must be >= 0")
    if torch.isin(nl, dnl).any():
        raise ValueError("a token id cannot be both a newline and a double-newline token")
    size = (int(ids.max()) + 2) if ids.numel() else 1
    table = torch.zeros(size, dtype=torch.int8)
    table[nl] = 1
    table[dnl] = 2
    return table.to(device)
