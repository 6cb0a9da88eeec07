"""The review encoder: the resident BERT-family model, its tokenizer/forward threads, the sentiment head."""
