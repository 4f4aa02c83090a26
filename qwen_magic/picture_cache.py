"""Pictures processed once: a conversation's later turns do not run the image processor again.

Every turn sends the processor the whole window, pictures included, as the classic recipe
does, and the image processor (resize, normalize, cut into patches) is most of a follow-up
question's wait while a figure stays in the window. Here each picture, named by its hash,
keeps its decoded image and what the image processor made of it, with the keyword arguments
the processor passed; for one processor call the image processor is stood in for by the
pictures' kept results, concatenated in order. The processor still renders the text, expands
the image tokens and tokenizes, so the inputs are the recipe's own (the tests compare them,
tensor for tensor, with a direct processor call).
"""

import hashlib
import threading
from collections import OrderedDict
from contextlib import contextmanager
from typing import Dict, List

import torch

from .images import open_image

KEPT = 8  # pictures kept (about 19 MB of pixel values each for a 1024x768 figure)


class Picture:
    def __init__(self, png: bytes):
        self.image = open_image(png)
        self.features: Dict[str, dict] = {}  # the image processor's output for this picture alone, by its kwargs


class PictureCache:
    def __init__(self, kept: int = KEPT):
        self.kept = kept
        self.pictures: "OrderedDict[str, Picture]" = OrderedDict()
        self.lock = threading.Lock()

    def take(self, pngs: List[bytes]) -> List[Picture]:
        """The pictures of one call, kept or new; then the least recently used beyond ``kept`` are let go."""
        taken = []
        for png in pngs:
            name = hashlib.sha256(png).hexdigest()
            picture = self.pictures.get(name)
            if picture is None:
                picture = self.pictures[name] = Picture(png)
            self.pictures.move_to_end(name)
            taken.append(picture)
        while len(self.pictures) > self.kept:
            self.pictures.popitem(last=False)
        return taken

    @contextmanager
    def standing_in(self, processor, pictures: List[Picture]):
        """Within: ``processor``'s image processor answers from the pictures' kept results."""
        real = processor.image_processor
        processor.image_processor = _StandIn(real, pictures)
        try:
            yield
        finally:
            processor.image_processor = real


class _StandIn:
    """The image processor for one call: each picture processed alone once (as the real one would
    process it in a batch), the results concatenated in the pictures' order."""

    def __init__(self, real, pictures: List[Picture]):
        self._real, self._pictures = real, pictures

    def __getattr__(self, name):
        return getattr(self._real, name)

    def __call__(self, images=None, *args, **kwargs):
        if args or images is None or len(images) != len(self._pictures):
            return self._real(images, *args, **kwargs)
        key = repr(sorted(kwargs.items(), key=lambda item: item[0]))
        parts = []
        for picture in self._pictures:
            if key not in picture.features:
                alone = self._real(images=[picture.image], **kwargs)
                if not all(isinstance(value, torch.Tensor) for value in alone.values()):
                    return self._real(images, **kwargs)  # not tensors: nothing to concatenate, the plain call
                picture.features = {key: dict(alone)}
            parts.append(picture.features[key])
        if any(part.keys() != parts[0].keys() for part in parts):
            return self._real(images, **kwargs)
        from transformers import BatchFeature

        return BatchFeature({name: torch.cat([part[name] for part in parts]) for name in parts[0]})
