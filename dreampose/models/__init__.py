"""The networks and what identifies them: the 14-channel UNet, the CLIP-VAE adapter, the
:class:`~dreampose.models.bundle.DreamPoseModel` bundle (and our file format), devices and dtypes, LoRA
deltas, weight fingerprints."""
