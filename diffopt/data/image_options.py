"""The image datasets' options, apart from their loaders (``diffopt.data.images``), which import
torchmeta's image datasets and through them torchvision: seconds a command line need not wait."""

OMNIGLOT_IMAGES = ("bilinear", "nearest", "nearest_strokes_0")
"""Omniglot preprocessing: ``bilinear`` torchmeta's (antialiased resize: grey strokes 1, the
default, one pipeline for every algorithm); ``nearest`` a nearest-neighbour resize of the binary
image, strokes 1 (cbfinn/maml: LANCZOS on a 1-bit PNG is nearest, then inverted); and
``nearest_strokes_0`` the same, strokes 0 (supervised-reptile, MAML++: not inverted)."""


CLASS_SPLITS = ("vinyals", "vinyals_trainval", "reptile")
"""Omniglot's character split: ``vinyals`` (Vinyals et al.'s, by alphabet, 1028 / 172 / 423:
torchmeta's, MAML's usual one), ``vinyals_trainval`` (the same with its validation characters
meta-trained on too, 1200 / 423, no meta-validation: Snell et al.'s final-model protocol, the
1200 training characters of MAML's and Reptile's papers) or ``reptile`` (supervised-reptile's:
every character, shuffled, 1200 meta-train / 423 meta-test, no meta-validation)."""
WITHOUT_VALIDATION = ("vinyals_trainval", "reptile")
"""The class splits that leave no characters to validate on."""
