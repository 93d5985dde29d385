"""One exception type for every input the user can get wrong.

It subclasses ValueError so callers that already catch bad-argument errors keep working, and its
message always says what was wrong and what to do about it.
"""


class DreamPoseError(ValueError):
    """Bad user input: wrong size, missing file, wrong checkpoint layout, mismatched counts."""
