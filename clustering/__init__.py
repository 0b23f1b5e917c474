"""Document embeddings and (balanced) k-means clustering. No Luigi in here."""
