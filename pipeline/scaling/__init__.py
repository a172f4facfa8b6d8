"""Scaling laws fitted to finished runs: Kaplan et al. (2020) power laws and Hoffmann et al. (2022) L(N, D)."""
