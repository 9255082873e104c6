"""Weight initialisation for replacement modules: pure tensor math, no modules."""
