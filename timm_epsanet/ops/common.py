"""Helpers every PSA branch-convolution implementation shares."""


def same_padding(kernel_size: int, dilation: int) -> int:
    """Padding that keeps a (possibly dilated) odd-kernel branch aligned with its input, as the PSA builds it."""
    return dilation * (kernel_size - 1) // 2
