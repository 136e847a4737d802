# Start VM ERP-01 on the primary (hv1).
. (Join-Path $PSScriptRoot 'env.ps1')
& (Join-Path $PSScriptRoot 'prepare.ps1')
$vm = Get-VM -Name $VmName -ErrorAction SilentlyContinue
if (-not $vm) { throw "VM $VmName is not registered on hv1 and no .vmcx is under $VmDir: is the replicated folder up to date?" }
switch ($vm.State) {
    'Running' { exit 0 }
    'Paused' { Resume-VM -VM $vm; exit 0 }
    'Saved' {
        # A saved state taken on the other host may not restore here (other CPU): boot instead.
        try { Start-VM -VM $vm }
        catch {
            Write-Warning "restoring the saved state of $VmName failed ($_): discarding it and booting"
            Remove-VMSavedState -VM $vm
            Start-VM -VM $vm
        }
    }
    default { Start-VM -VM $vm }
}
