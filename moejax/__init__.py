"""moejax: offloaded Mixture-of-Experts inference and importance-driven expert scheduling in JAX."""
