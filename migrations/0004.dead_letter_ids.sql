-- Dead letters are stored once (issue 6): a failure reported twice (a redelivered batch, a
-- delivery outcome published again after a crash) carries the same letter id.
ALTER TABLE dead_letters ADD COLUMN letter_id VARCHAR(255);

CREATE UNIQUE INDEX uq_dead_letters_letter_id ON dead_letters (letter_id) WHERE letter_id IS NOT NULL;

COMMENT ON COLUMN dead_letters.letter_id IS 'topic:partition:offset:reason of the failed record, or dispatch_id:reason of a failed delivery';
