"""Data on disk and how it is made: the prepared-video layout, DensePose estimation from TorchScript
exports, ``prepare`` (videos → prepared folders), the synthetic world and simple synthetic inputs."""
