"""Datasets: offline defaults (Fashion-MNIST, scikit-learn digits, text corpora) and standard sources."""
