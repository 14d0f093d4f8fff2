"""The special token ids that the data and the models agree on, in one place.

The synthetic sequence task writes them (`data.sources.Reversal`), the encoder-decoder masks and
decodes with them (`models.seq2seq`), and every decoder emits padding once a sequence has ended
(`models.decoding`). A leaf module, so that data and models share it without importing each other.
A subword tokenizer brings its own BOS and EOS ids (`data.tokenizer`); padding stays 0.
"""

PAD_ID = 0  # padding everywhere: masked out of losses, and what a finished sequence emits
BOS_ID = 1  # the sequence task's start token: the decoder's first input
EOS_ID = 2  # the sequence task's end token: decoding stops there
