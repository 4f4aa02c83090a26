"""Teacher forcing for turns with pictures: the fast engine's logits (prefill with the picture, then one
forced token at a time) and a plain forward of the recipe's model at the 3-D positions ``generate`` uses."""

import torch

from qwen_magic.images import digest


def picture_forced_logits(vision, messages, pngs, reply):
    """The fast engine's logits after a prompt with pictures and after each forced reply token (graph decode)."""
    from qwen_magic.vision import Layout, image_spans

    fast = vision.text_engine
    inputs, _ = vision.prompt.inputs(messages)
    ids = inputs["input_ids"][0].tolist()
    positions, delta = vision._rotary(inputs.to(fast.device))
    layout = Layout(ids, positions, delta, image_spans(ids, vision.image_token, [digest(p) for p in pngs]))
    with fast.lock, torch.inference_mode():
        fast.cached_ids, vision.layout = [], None
        if fast.states is not None:
            fast.states.clear()
            fast.states.reset()
        fast.rope_delta.fill_(delta)
        fast.chunk_inputs = vision._chunks(layout, inputs)
        try:
            rows = [fast.prefill(ids, reserve=len(reply) + 1)]
        finally:
            fast.chunk_inputs = None
        for offset, token in enumerate(reply):
            rows.append(fast.step(torch.tensor([[token]], device=fast.device), len(ids) + offset).clone())
        fast.cached_ids = []
    return torch.cat(rows), inputs, positions


def picture_reference_logits(model, inputs, positions, reply, incremental=False):
    """A plain forward over prompt and reply (or the recipe's dynamic cache, one token at a time), at the
    3-D positions generate computes: the prompt's, then text position + rope_deltas."""
    device = model.device
    prompt = inputs["input_ids"].shape[1]
    delta = int(positions[:, -1].max()) + 1 - prompt
    positions = positions.to(device)
    tail = (torch.arange(prompt, prompt + len(reply), device=device) + delta).expand(3, -1)
    every = torch.cat([positions, tail], dim=1)[:, None]
    ids = torch.cat([inputs["input_ids"].to(device), torch.tensor([reply], device=device)], dim=1)
    pictures = {"pixel_values": inputs["pixel_values"].to(device), "image_grid_thw": inputs["image_grid_thw"].to(device)}
    with torch.inference_mode():
        if not incremental:
            return model(input_ids=ids, position_ids=every, **pictures).logits[0, prompt - 1:]
        out = model(input_ids=ids[:, :prompt], position_ids=every[:, :, :prompt], use_cache=True, **pictures)
        rows = [out.logits[:, -1]]
        for i in range(len(reply)):
            out = model(input_ids=ids[:, prompt + i:prompt + i + 1], position_ids=every[:, :, prompt + i:prompt + i + 1],
                        past_key_values=out.past_key_values, use_cache=True)
            rows.append(out.logits[:, -1])
    return torch.cat(rows)
