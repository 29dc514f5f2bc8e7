"""The house itself: import layers, file sizes, the contract document, small units."""
