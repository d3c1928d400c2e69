"""fuse() / unfuse(): swap fused forwards into the blocks of an existing model, in place.

How: a matched block's class is swapped for a subclass whose `forward` calls the fused ops on the
block's own submodules. Nothing else changes: the same submodules, Parameter objects and buffers,
so state_dict keys and optimizer state carry over untouched and unfuse() is a class swap back.

Which blocks: a registry of patterns keyed by the exact qualified class name (so fusedres never
imports torchvision or transformers itself). A subclass of a known block is skipped, because its
forward may differ; so is a block whose parts are not what the pattern needs (another activation,
another norm), with the reason in the report.
"""

from __future__ import annotations

import copy
import logging
import sys
from collections.abc import Callable
from dataclasses import dataclass, field

from torch import nn

logger = logging.getLogger("fusedres")


@dataclass(frozen=True)
class Pattern:
    """One fusable block type: `check(module)` returns None when the block can be fused, else the
    reason it cannot; `forward` replaces the class's forward; `fuses` says what is fused."""

    class_path: str
    fuses: str
    check: Callable[[nn.Module], str | None]
    forward: Callable
    prepare: Callable[[nn.Module], None] | None = None  # called on fuse (e.g. to turn off a fast path)
    restore: Callable[[nn.Module], None] | None = None  # undoes prepare on unfuse


PATTERNS: dict[str, Pattern] = {}


def register(pattern: Pattern) -> Pattern:
    PATTERNS[pattern.class_path] = pattern
    return pattern


def class_path(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


@dataclass
class FuseReport:
    """What fuse() did: `replaced` and `skipped` are lists of (module name, description/reason);
    `carried` lists the stacks whose blocks' last adds were fused into the next block's first
    norm (module name, what); `sites` counts the add -> norm sites fused by structure."""

    replaced: list[tuple[str, str]] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    carried: list[tuple[str, str]] = field(default_factory=list)
    sites: int = 0

    def __bool__(self) -> bool:
        return bool(self.replaced)

    def __str__(self) -> str:
        head = f"fusedres.fuse: {len(self.replaced)} block(s) fused, {len(self.skipped)} skipped"
        if self.sites:
            head += f"; {self.sites} add+norm site(s) fused"
        lines = [head]
        lines += [f"  fused   {name or '<model>'}: {what}" for name, what in self.replaced]
        lines += [f"  carried {name or '<model>'}: {what}" for name, what in self.carried]
        lines += [f"  skipped {name or '<model>'}: {why}" for name, why in self.skipped]
        return "\n".join(lines)


_FUSED_CLASSES: dict[type, type] = {}


def fused_class(original: type, pattern: Pattern) -> type:
    """The subclass of `original` whose forward is the pattern's. Registered under its name in this
    module, so a fused model pickles within the process; save state_dicts to move checkpoints."""
    cls = _FUSED_CLASSES.get(original)
    if cls is None:
        name = f"Fused_{original.__module__.replace('.', '_')}_{original.__qualname__.replace('.', '_')}"
        cls = type(
            name,
            (original,),
            {"forward": pattern.forward, "_fusedres_original": original, "__module__": __name__},
        )
        cls.__qualname__ = name
        setattr(sys.modules[__name__], name, cls)
        _FUSED_CLASSES[original] = cls
    return cls


def _is_fused(module: nn.Module) -> bool:
    return "_fusedres_original" in type(module).__dict__


def _known_base(cls: type) -> Pattern | None:
    for base in cls.__mro__[1:]:
        if class_path(base) in PATTERNS:
            return PATTERNS[class_path(base)]
    return None


def fuse(model: nn.Module, *, inplace: bool = True, report: bool = False):
    """Swap fused forwards into every fusable block of `model` (and `model` itself).

    A recognised block (torchvision / timm ResNet blocks, nn.Transformer*Layer, HF BERT,
    RoBERTa, GPT-2, Llama, Mistral, Qwen2 layers; matched by exact class) gets a subclass whose
    forward calls the fused ops on its own submodules: parameters, buffers, state_dict keys and
    optimizer state are untouched. Anything else is left alone, with the reason in the report.

    Args:
        model: the module to fuse.
        inplace: False fuses a deep copy and leaves `model` as it was.
        report: also return a FuseReport (what was fused, what was skipped and why); it is
            logged at INFO on the "fusedres" logger either way.

    Returns:
        The fused model, or (model, FuseReport) with ``report=True``.

    Example::

        >>> model = torchvision.models.resnet50()
        >>> model, report = fusedres.fuse(model, report=True)
        >>> fusedres.unfuse(model)  # the original classes and forwards back
    """
    # The patterns of the libraries this process has imported; importing them is cheap because
    # matching is by class name and nothing of torchvision/transformers is imported here.
    from fusedres.convert import resnet, structural, torch_transformer  # noqa: F401

    if not inplace:
        model = copy.deepcopy(model)
    summary = FuseReport()
    by_pattern: set[int] = set()  # modules the registry decided on; the rest go by structure
    for name, module in model.named_modules():
        cls = type(module)
        if _is_fused(module):
            continue
        pattern = PATTERNS.get(class_path(cls))
        if pattern is None:
            base = _known_base(cls)
            if base is not None:
                by_pattern.add(id(module))
                summary.skipped.append(
                    (name, f"{cls.__name__} subclasses {base.class_path}; its forward may differ, so it is left alone")
                )
            continue
        by_pattern.add(id(module))
        reason = pattern.check(module)
        if reason is not None:
            summary.skipped.append((name, f"{cls.__name__}: {reason}"))
            continue
        if pattern.prepare is not None:
            pattern.prepare(module)
        module.__class__ = fused_class(cls, pattern)
        summary.replaced.append((name, f"{cls.__name__}: {pattern.fuses}"))
    structural.fuse_blocks(model, summary, by_pattern)
    logger.info("%s", summary)
    return (model, summary) if report else model


def unfuse(model: nn.Module) -> nn.Module:
    """Undo fuse() in place: every fused block gets its original class (and forward) back."""
    for module in model.modules():
        if not _is_fused(module):
            continue
        fused = type(module)
        original = fused._fusedres_original
        pattern = PATTERNS.get(class_path(original))
        module.__class__ = original
        if pattern is not None and pattern.restore is not None:
            pattern.restore(module)
        restore = vars(fused).get("_fusedres_restore")  # blocks fused by structure keep state per instance
        if restore is not None:
            restore(module)
    for module in model.modules():
        module.__dict__.pop("_fusedres_folded", None)
    return model
