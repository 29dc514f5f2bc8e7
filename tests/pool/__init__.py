"""The rank pool: faults, timeouts, output, cleanup; torchrun mode; eight-rank layouts."""
