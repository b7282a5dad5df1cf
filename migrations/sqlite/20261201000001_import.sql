-- Bulk import (CardVault.ImportCards): the caller's own id for an imported card, unique per
-- tenant, so an interrupted import can be sent again and each card is stored once.
ALTER TABLE cards ADD COLUMN import_id TEXT;
CREATE UNIQUE INDEX cards_import_id ON cards (tenant_id, import_id) WHERE import_id IS NOT NULL;
