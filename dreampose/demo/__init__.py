"""The shipped demo model (a miniature DreamPose trained on the synthetic world), how it is built, and the
tiny random models of the real classes that tests and benchmarks use."""
