"""The output vocabulary: build the merged tokenizer and re-index every input's embeddings to it."""

from mergesmith.tokenizer.align import VocabAlignment, align_vocabularies, aligned_sources, save_vocabulary

__all__ = ["VocabAlignment", "align_vocabularies", "aligned_sources", "save_vocabulary"]
